//! From a view's SQL plan to a tree of incremental operators.
//!
//! The analyzed (type-coerced, not optimized) logical plan is walked from the top. Each
//! supported node becomes an operator whose expressions are DataFusion physical
//! expressions over that node's input, so values are computed exactly as a query would
//! compute them. Anything else makes the whole view a recompute view, with the reason.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::common::{DataFusionError, Result};
use datafusion::physical_expr::PhysicalExpr;

use super::agg::Aggregate;
use super::codec::Reader;
use super::ops::{DistinctOn, Join};
use super::temporal::{CLOCK, Temporal, clock_time};
use super::tracked::{Part, Spillable};
use super::zset::{ZBatch, evaluate};

mod compile;
pub(crate) use compile::compile;

/// What a view reads.
#[derive(Debug, Clone)]
pub(crate) enum SourceKind {
    /// An event stream: rows are only ever added.
    Stream,
    /// Another view, with its key columns.
    View { key: Option<Vec<usize>> },
}

/// Rows listed at once when state is computed again after a restore.
const REBUILD_ROWS: usize = 65_536;

/// One operator with what it produces.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) op: Op,
    pub(crate) schema: SchemaRef,
    /// Columns that identify an output row, when known.
    pub(crate) key: Option<Vec<usize>>,
    /// The output only ever gains rows.
    pub(crate) append_only: bool,
    label: String,
}

#[derive(Debug)]
pub(crate) enum Op {
    Source {
        name: String,
        projection: Option<Vec<usize>>,
    },
    Filter {
        input: Box<Node>,
        predicate: Arc<dyn PhysicalExpr>,
    },
    Project {
        input: Box<Node>,
        exprs: Vec<Arc<dyn PhysicalExpr>>,
    },
    Aggregate {
        input: Box<Node>,
        agg: Box<Aggregate>,
    },
    DistinctOn {
        input: Box<Node>,
        op: Box<DistinctOn>,
    },
    Join {
        left: Box<Node>,
        right: Box<Node>,
        op: Box<Join>,
    },
    /// Conditions on `now()`, kept true as the clock moves.
    Temporal {
        input: Box<Node>,
        op: Box<Temporal>,
        /// The operator below may forget the rows this one lets go for good.
        forget_below: bool,
    },
}

/// Why a plan cannot be maintained incrementally: shown as the view's `reason` when it
/// falls back to recomputing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotIncremental(pub(crate) String);

impl std::fmt::Display for NotIncremental {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for NotIncremental {
    fn from(reason: String) -> Self {
        Self(reason)
    }
}

impl From<&str> for NotIncremental {
    fn from(reason: &str) -> Self {
        Self(reason.to_owned())
    }
}

/// The rows of `d` for which `predicate` holds.
fn filter(predicate: &Arc<dyn PhysicalExpr>, d: ZBatch) -> Result<ZBatch> {
    if d.is_empty() {
        return Ok(d);
    }
    let mask = predicate.evaluate(&d.batch)?.into_array(d.len())?;
    let mask = mask
        .as_boolean_opt()
        .ok_or_else(|| DataFusionError::Internal("a filter did not give booleans".into()))?;
    d.filter(mask)
}

/// `exprs` evaluated over the rows of `d`, with their weights.
fn project(schema: &SchemaRef, exprs: &[Arc<dyn PhysicalExpr>], d: ZBatch) -> Result<ZBatch> {
    let columns = evaluate(exprs, &d.batch)?;
    let batch = if columns.is_empty() {
        RecordBatch::try_new_with_options(
            Arc::clone(schema),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(d.len())),
        )?
    } else {
        RecordBatch::try_new(Arc::clone(schema), columns)?
    };
    Ok(ZBatch {
        batch,
        weights: d.weights,
    })
}

impl Node {
    /// Streams and views this node reads, in the order they appear.
    pub(crate) fn sources(&self, out: &mut Vec<String>) {
        match &self.op {
            Op::Source { name, .. } => {
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
            Op::Filter { input, .. }
            | Op::Project { input, .. }
            | Op::Aggregate { input, .. }
            | Op::DistinctOn { input, .. }
            | Op::Temporal { input, .. } => input.sources(out),
            Op::Join { left, right, .. } => {
                left.sources(out);
                right.sources(out);
            }
        }
    }

    /// Feeds changes of `source` (in that source's full schema) through the tree.
    pub(crate) fn apply(&mut self, source: &str, delta: &ZBatch) -> Result<Option<ZBatch>> {
        Ok(match &mut self.op {
            Op::Source { name, projection } => {
                if name != source {
                    return Ok(None);
                }
                let batch = match projection {
                    Some(p) => delta.batch.project(p)?,
                    None => delta.batch.clone(),
                };
                let batch = if batch.schema() == self.schema {
                    batch
                } else {
                    crate::query::cast_batch(&batch, &self.schema)?
                };
                Some(ZBatch {
                    batch,
                    weights: delta.weights.clone(),
                })
            }
            Op::Filter { input, predicate } => match input.apply(source, delta)? {
                Some(d) => Some(filter(predicate, d)?),
                None => None,
            },
            Op::Project { input, exprs } => match input.apply(source, delta)? {
                Some(d) => Some(project(&self.schema, exprs, d)?),
                None => None,
            },
            Op::Aggregate { input, agg } => match input.apply(source, delta)? {
                Some(d) => Some(agg.apply(&d)?),
                None => None,
            },
            Op::DistinctOn { input, op } => match input.apply(source, delta)? {
                Some(d) => Some(op.apply(&d)?),
                None => None,
            },
            Op::Join { left, right, op } => {
                let l = left.apply(source, delta)?;
                let r = right.apply(source, delta)?;
                let mut parts = Vec::new();
                if let Some(l) = l {
                    parts.push(op.apply(&l, true)?);
                }
                if let Some(r) = r {
                    parts.push(op.apply(&r, false)?);
                }
                match parts.len() {
                    0 => None,
                    _ => Some(ZBatch::concat(&self.schema, &parts)?),
                }
            }
            Op::Temporal {
                input,
                op,
                forget_below,
            } => {
                let mut parts = Vec::new();
                if source == CLOCK
                    && let Some(now) = clock_time(delta)
                {
                    let below: &Node = input;
                    parts.extend(op.advance(now, &mut |keys| below.rows_by_key(keys))?);
                }
                if let Some(d) = input.apply(source, delta)? {
                    parts.push(op.apply(&d)?);
                }
                if let Some(gone) = op.take_gone()?
                    && *forget_below
                {
                    input.forget(&gone)?;
                }
                parts.retain(|p| !p.is_empty());
                match parts.len() {
                    0 => None,
                    _ => Some(ZBatch::concat(&self.schema, &parts)?),
                }
            }
        })
    }

    /// Lets the operator producing this node's rows forget `rows` (of this node's
    /// schema), which will never be wanted again: only a GROUP BY or a `DISTINCT ON`
    /// right below a temporal filter is asked to.
    fn forget(&mut self, rows: &RecordBatch) -> Result<()> {
        let Some(key) = self.key.clone() else {
            return Ok(());
        };
        let columns: Vec<arrow::array::ArrayRef> =
            key.iter().map(|&i| Arc::clone(rows.column(i))).collect();
        match &mut self.op {
            Op::Aggregate { agg, .. } => agg.forget(&columns),
            Op::DistinctOn { op, .. } => op.forget(&columns),
            _ => Ok(()),
        }
    }

    /// The rows this node's operator holds for keys (its key columns), encoded as whole
    /// rows of its schema: for a temporal filter over a `DISTINCT ON`.
    fn rows_by_key(&self, keys: &[arrow::array::ArrayRef]) -> Result<Vec<Option<Box<[u8]>>>> {
        match &self.op {
            Op::DistinctOn { op, .. } => op.rows_by_key(keys),
            _ => Err(DataFusionError::Internal(format!(
                "{} does not hold its rows by key",
                self.label
            ))),
        }
    }

    /// The earliest instant (microseconds since the epoch) at which a temporal filter
    /// in this tree has rows to let in or out.
    pub(crate) fn next_due(&self) -> Option<i64> {
        match &self.op {
            Op::Source { .. } => None,
            Op::Filter { input, .. }
            | Op::Project { input, .. }
            | Op::Aggregate { input, .. }
            | Op::DistinctOn { input, .. } => input.next_due(),
            Op::Temporal { input, op, .. } => match (op.next_due(), input.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Op::Join { left, right, .. } => match (left.next_due(), right.next_due()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// After a restore: state that is not checkpointed is computed again from the
    /// state below it (a temporal filter over a `DISTINCT ON`).
    pub(crate) fn after_restore(&mut self) -> Result<()> {
        match &mut self.op {
            Op::Source { .. } => Ok(()),
            Op::Filter { input, .. }
            | Op::Project { input, .. }
            | Op::Aggregate { input, .. }
            | Op::DistinctOn { input, .. } => input.after_restore(),
            Op::Join { left, right, .. } => {
                left.after_restore()?;
                right.after_restore()
            }
            Op::Temporal { input, op, .. } => {
                input.after_restore()?;
                if op.rebuilds() {
                    input.emit_all(REBUILD_ROWS, &mut |rows| op.rebuild(&rows))?;
                }
                Ok(())
            }
        }
    }

    /// Whether a temporal filter is in this tree (the view changes with the time).
    pub(crate) fn has_temporal(&self) -> bool {
        match &self.op {
            Op::Source { .. } => false,
            Op::Temporal { .. } => true,
            Op::Filter { input, .. }
            | Op::Project { input, .. }
            | Op::Aggregate { input, .. }
            | Op::DistinctOn { input, .. } => input.has_temporal(),
            Op::Join { left, right, .. } => left.has_temporal() || right.has_temporal(),
        }
    }

    /// Whether [`Node::emit_all`] can list this node's whole output from operator
    /// state. Then a checkpoint need not hold the view's rows: they are rebuilt from
    /// the state on restore.
    pub(crate) fn can_emit_all(&self) -> bool {
        match &self.op {
            Op::Source { .. } => false,
            Op::Filter { input, .. } | Op::Project { input, .. } | Op::Temporal { input, .. } => {
                input.can_emit_all()
            }
            Op::Aggregate { .. } | Op::DistinctOn { .. } => true,
            Op::Join { op, .. } => op.can_emit_all(),
        }
    }

    /// Lists this node's whole output as weighted rows, in batches of about `chunk`
    /// rows, from the state of the nearest stateful operators.
    pub(crate) fn emit_all(
        &self,
        chunk: usize,
        f: &mut dyn FnMut(ZBatch) -> Result<()>,
    ) -> Result<()> {
        match &self.op {
            Op::Source { name, .. } => Err(DataFusionError::Internal(format!(
                "the rows read from {name} are not kept"
            ))),
            Op::Filter { input, predicate } => {
                input.emit_all(chunk, &mut |d| f(filter(predicate, d)?))
            }
            Op::Project { input, exprs } => {
                input.emit_all(chunk, &mut |d| f(project(&self.schema, exprs, d)?))
            }
            Op::Temporal { input, op, .. } => input.emit_all(chunk, &mut |d| f(op.holding(d)?)),
            Op::Aggregate { agg, .. } => agg.emit_all(chunk, f),
            Op::DistinctOn { op, .. } => op.emit_all(chunk, f),
            Op::Join { op, .. } => op.emit_all(chunk, f),
        }
    }

    /// What a checkpoint holds of every stateful operator, depth first, in the order
    /// [`Node::load`] reads it.
    pub(crate) fn parts<'a>(&'a mut self, out: &mut Vec<Part<'a>>) {
        match &mut self.op {
            Op::Source { .. } => {}
            Op::Filter { input, .. } | Op::Project { input, .. } => input.parts(out),
            Op::Aggregate { input, agg } => {
                input.parts(out);
                agg.parts(out);
            }
            Op::DistinctOn { input, op } => {
                input.parts(out);
                op.parts(out);
            }
            Op::Temporal { input, op, .. } => {
                input.parts(out);
                op.parts(out);
            }
            Op::Join { left, right, op } => {
                left.parts(out);
                right.parts(out);
                op.parts(out);
            }
        }
    }

    /// Reads what [`Node::parts`] wrote; a delta is applied on the state held.
    pub(crate) fn load(&mut self, r: &mut Reader<'_>, delta: bool) -> Result<()> {
        match &mut self.op {
            Op::Source { .. } => Ok(()),
            Op::Filter { input, .. } | Op::Project { input, .. } => input.load(r, delta),
            Op::Aggregate { input, agg } => {
                input.load(r, delta)?;
                agg.load(r, delta)
            }
            Op::DistinctOn { input, op } => {
                input.load(r, delta)?;
                op.load(r, delta)
            }
            Op::Temporal { input, op, .. } => {
                input.load(r, delta)?;
                op.load(r, delta)
            }
            Op::Join { left, right, op } => {
                left.load(r, delta)?;
                right.load(r, delta)?;
                op.load(r, delta)
            }
        }
    }

    /// Approximate bytes of operator state.
    pub(crate) fn state_bytes(&self) -> usize {
        match &self.op {
            Op::Source { .. } => 0,
            Op::Filter { input, .. } | Op::Project { input, .. } => input.state_bytes(),
            Op::Aggregate { input, agg } => input.state_bytes() + agg.state_bytes(),
            Op::DistinctOn { input, op } => input.state_bytes() + op.state_bytes(),
            Op::Temporal { input, op, .. } => input.state_bytes() + op.state_bytes(),
            Op::Join { left, right, op } => {
                left.state_bytes() + right.state_bytes() + op.state_bytes()
            }
        }
    }

    /// Every map of operator state the maintainer may move to disk, depth first.
    pub(crate) fn maps<'a>(&'a mut self, out: &mut Vec<&'a mut dyn Spillable>) {
        match &mut self.op {
            Op::Source { .. } => {}
            // A temporal filter's spans and due times stay in memory.
            Op::Filter { input, .. } | Op::Project { input, .. } | Op::Temporal { input, .. } => {
                input.maps(out);
            }
            Op::Aggregate { input, agg } => {
                input.maps(out);
                out.extend(agg.maps());
            }
            Op::DistinctOn { input, op } => {
                input.maps(out);
                out.extend(op.maps());
            }
            Op::Join { left, right, op } => {
                left.maps(out);
                right.maps(out);
                out.extend(op.maps());
            }
        }
    }

    /// Bytes of operator state on disk.
    pub(crate) fn disk_bytes(&self) -> usize {
        match &self.op {
            Op::Source { .. } => 0,
            Op::Filter { input, .. } | Op::Project { input, .. } | Op::Temporal { input, .. } => {
                input.disk_bytes()
            }
            Op::Aggregate { input, agg } => input.disk_bytes() + agg.disk_bytes(),
            Op::DistinctOn { input, op } => input.disk_bytes() + op.disk_bytes(),
            Op::Join { left, right, op } => {
                left.disk_bytes() + right.disk_bytes() + op.disk_bytes()
            }
        }
    }

    /// The operator tree, one line per operator, for EXPLAIN.
    pub(crate) fn explain(&self, depth: usize, out: &mut Vec<String>) {
        let state = match &self.op {
            Op::Aggregate { agg, .. } => format!(" [state: {} groups]", agg.groups()),
            Op::DistinctOn { op, .. } => format!(" [state: latest row of {} keys]", op.keys()),
            Op::Join { op, .. } => format!(" [state: {} rows by join key]", op.pairs()),
            Op::Temporal {
                op, forget_below, ..
            } => format!(
                " [temporal: {} rows waiting to enter or leave{}]",
                op.kept(),
                if *forget_below {
                    "; the operator below forgets what leaves"
                } else {
                    ""
                }
            ),
            Op::Source { .. } if self.append_only => " [insert-only]".into(),
            Op::Source { .. } => " [updating]".into(),
            _ => String::new(),
        };
        out.push(format!("{}{}{}", "  ".repeat(depth), self.label, state));
        match &self.op {
            Op::Source { .. } => {}
            Op::Filter { input, .. }
            | Op::Project { input, .. }
            | Op::Aggregate { input, .. }
            | Op::DistinctOn { input, .. }
            | Op::Temporal { input, .. } => input.explain(depth + 1, out),
            Op::Join { left, right, .. } => {
                left.explain(depth + 1, out);
                right.explain(depth + 1, out);
            }
        }
    }
}

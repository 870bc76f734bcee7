//! Compiling: the analyzed logical plan, walked from the top, becomes a tree of
//! [`Node`]s, each with the physical expressions it evaluates. What cannot be
//! maintained is refused with the reason, and the view is recomputed instead.

use std::sync::Arc;

use arrow::compute::SortOptions;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::SortField;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNode;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    BinaryExpr, Distinct, Expr, ExprSchemable, JoinType, LogicalPlan, Operator, Volatility,
};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column as PhysColumn;

use super::super::agg::{AggKind, AggSpec, Aggregate, Num};
use super::super::ops::{DistinctOn, Join, JoinKind};
use super::super::temporal::{Bound, Temporal};
use super::super::zset::Codec;
use super::{Node, NotIncremental, Op, SourceKind};

/// Compiles an analyzed plan; `Err` says why it must be recomputed instead.
pub(crate) fn compile(
    plan: &LogicalPlan,
    state: &SessionState,
    source: &dyn Fn(&str) -> Option<SourceKind>,
) -> std::result::Result<Node, NotIncremental> {
    Compiler { state, source }.node(plan)
}

struct Compiler<'a> {
    state: &'a SessionState,
    source: &'a dyn Fn(&str) -> Option<SourceKind>,
}

fn label(plan: &LogicalPlan) -> String {
    plan.display().to_string()
}

impl Compiler<'_> {
    fn physical(
        &self,
        expr: &Expr,
        schema: &DFSchema,
    ) -> std::result::Result<Arc<dyn PhysicalExpr>, NotIncremental> {
        let time_dependent = expr
            .exists(|e| {
                Ok(match e {
                    Expr::ScalarFunction(f) => {
                        f.func.signature().volatility != Volatility::Immutable
                    }
                    _ => e.is_volatile_node(),
                })
            })
            .unwrap_or(true);
        if time_dependent {
            return Err(format!(
                "`{expr}` depends on the time or on chance, so its value changes without new events"
            )
            .into());
        }
        // Simplify first, as a query's optimizer would: some functions (COALESCE, NVL)
        // exist only to be rewritten there.
        let context = SimplifyContext::builder()
            .with_schema(Arc::new(schema.clone()))
            .with_config_options(Arc::clone(self.state.config_options()))
            .build();
        let expr = ExprSimplifier::new(context)
            .simplify(expr.clone())
            .map_err(|e| format!("`{expr}` cannot be simplified: {}", e.strip_backtrace()))?;
        self.state
            .create_physical_expr(expr.clone(), schema)
            .map_err(|e| {
                format!(
                    "`{expr}` cannot be evaluated per row: {}",
                    e.strip_backtrace()
                )
                .into()
            })
    }

    fn physical_all(
        &self,
        exprs: &[Expr],
        schema: &DFSchema,
    ) -> std::result::Result<Vec<Arc<dyn PhysicalExpr>>, NotIncremental> {
        exprs.iter().map(|e| self.physical(e, schema)).collect()
    }

    fn node(&self, plan: &LogicalPlan) -> std::result::Result<Node, NotIncremental> {
        let schema: SchemaRef = Arc::clone(plan.schema().inner());
        match plan {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table().to_owned();
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(format!("the scan of {name} carries filters or a limit").into());
                }
                let kind = (self.source)(&name)
                    .ok_or_else(|| format!("{name} is neither a stream nor a view"))?;
                let (key, append_only) = match kind {
                    SourceKind::Stream => (None, true),
                    SourceKind::View { key } => {
                        let key = match (&scan.projection, key) {
                            (None, k) => k,
                            (Some(p), Some(k)) => k
                                .iter()
                                .map(|c| p.iter().position(|x| x == c))
                                .collect::<Option<Vec<_>>>(),
                            (Some(_), None) => None,
                        };
                        (key, false)
                    }
                };
                Ok(Node {
                    op: Op::Source {
                        name,
                        projection: scan.projection.clone(),
                    },
                    schema,
                    key,
                    append_only,
                    label: label(plan),
                })
            }
            LogicalPlan::SubqueryAlias(a) => self.node(&a.input),
            LogicalPlan::Sort(s) if s.fetch.is_none() => self.node(&s.input),
            LogicalPlan::Filter(f) => {
                let mut node = self.node(&f.input)?;
                let in_schema = f.input.schema();
                let (plain, temporal) = self.split_temporal(&f.predicate, in_schema)?;
                if let Some(plain) = plain {
                    let predicate = self.physical(&plain, in_schema)?;
                    node = Node {
                        schema: Arc::clone(&schema),
                        key: node.key.clone(),
                        append_only: node.append_only,
                        label: label(plan),
                        op: Op::Filter {
                            input: Box::new(node),
                            predicate,
                        },
                    };
                }
                if let Some(t) = temporal {
                    node = self.temporal(plan, node, t, in_schema, schema)?;
                }
                Ok(node)
            }
            LogicalPlan::Projection(p) => {
                let input = self.node(&p.input)?;
                let exprs = self.physical_all(&p.expr, p.input.schema())?;
                let in_schema = p.input.schema();
                let key = input.key.as_ref().and_then(|k| {
                    k.iter()
                        .map(|&c| {
                            p.expr.iter().position(|e| {
                                e.clone()
                                    .unalias()
                                    .try_as_col()
                                    .and_then(|col| in_schema.index_of_column(col).ok())
                                    == Some(c)
                            })
                        })
                        .collect::<Option<Vec<_>>>()
                });
                Ok(Node {
                    schema,
                    key,
                    append_only: input.append_only,
                    label: label(plan),
                    op: Op::Project {
                        input: Box::new(input),
                        exprs,
                    },
                })
            }
            LogicalPlan::Aggregate(a) => {
                let input = self.node(&a.input)?;
                if a.group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::GroupingSet(_)))
                {
                    return Err("GROUPING SETS, CUBE and ROLLUP are recomputed".into());
                }
                let in_schema = a.input.schema();
                let group_exprs = self.physical_all(&a.group_expr, in_schema)?;
                let n = group_exprs.len();
                let group_types = schema.fields()[..n]
                    .iter()
                    .map(|f| f.data_type().clone())
                    .collect();
                let specs = a
                    .aggr_expr
                    .iter()
                    .enumerate()
                    .map(|(j, e)| {
                        let out = schema.field(n + j).data_type().clone();
                        self.aggregate(e, in_schema, out)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                aggregate_node(plan, input, group_exprs, group_types, specs, schema)
            }
            LogicalPlan::Distinct(Distinct::All(inner)) => {
                let input = self.node(inner)?;
                let group_exprs: Vec<Arc<dyn PhysicalExpr>> = schema
                    .fields()
                    .iter()
                    .enumerate()
                    .map(|(i, f)| Arc::new(PhysColumn::new(f.name(), i)) as Arc<dyn PhysicalExpr>)
                    .collect();
                let types = schema
                    .fields()
                    .iter()
                    .map(|f| f.data_type().clone())
                    .collect();
                aggregate_node(plan, input, group_exprs, types, vec![], schema)
            }
            LogicalPlan::Distinct(Distinct::On(d)) => {
                let input = self.node(&d.input)?;
                if !input.append_only {
                    return Err(
                        "DISTINCT ON is maintained over streams (insert-only inputs) only".into(),
                    );
                }
                let in_schema = d.input.schema();
                let on = self.physical_all(&d.on_expr, in_schema)?;
                let key_types = d
                    .on_expr
                    .iter()
                    .map(|e| e.get_type(in_schema).map_err(|e| e.to_string()))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let sorts = d.sort_expr.clone().unwrap_or_default();
                let rest = sorts.get(d.on_expr.len()..).unwrap_or_default();
                let order = rest
                    .iter()
                    .map(|s| self.physical(&s.expr, in_schema))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let order_fields = rest
                    .iter()
                    .map(|s| {
                        let t = s.expr.get_type(in_schema).map_err(|e| e.to_string())?;
                        Ok(SortField::new_with_options(
                            t,
                            SortOptions {
                                descending: !s.asc,
                                nulls_first: s.nulls_first,
                            },
                        ))
                    })
                    .collect::<std::result::Result<Vec<_>, String>>()?;
                let select = self.physical_all(&d.select_expr, in_schema)?;
                let key = d
                    .on_expr
                    .iter()
                    .map(|on| {
                        let on = on.clone().unalias();
                        d.select_expr.iter().position(|s| s.clone().unalias() == on)
                    })
                    .collect::<Option<Vec<_>>>();
                let op = DistinctOn::new(
                    on,
                    Codec::new(key_types).map_err(|e| e.to_string())?,
                    order,
                    Codec::sorted(order_fields).map_err(|e| e.to_string())?,
                    select,
                    Arc::clone(&schema),
                )
                .map_err(|e| e.to_string())?;
                Ok(Node {
                    key,
                    append_only: false,
                    label: label(plan),
                    op: Op::DistinctOn {
                        input: Box::new(input),
                        op: Box::new(op),
                    },
                    schema,
                })
            }
            LogicalPlan::Join(j) => self.join(plan, j, schema),
            other => Err(format!(
                "{} is not maintained incrementally",
                other
                    .display()
                    .to_string()
                    .split(':')
                    .next()
                    .unwrap_or("this plan")
            )
            .into()),
        }
    }

    fn join(
        &self,
        plan: &LogicalPlan,
        j: &datafusion::logical_expr::Join,
        schema: SchemaRef,
    ) -> std::result::Result<Node, NotIncremental> {
        let kind = match j.join_type {
            JoinType::Inner => JoinKind::Inner,
            JoinType::Left => JoinKind::Left,
            other => return Err(format!("{other} joins are recomputed").into()),
        };
        let (ls, rs) = (j.left.schema(), j.right.schema());
        let mut pairs: Vec<(Expr, Expr)> = j.on.clone();
        if let Some(filter) = &j.filter {
            for part in datafusion::logical_expr::utils::split_conjunction(filter) {
                let Expr::BinaryExpr(BinaryExpr {
                    left,
                    op: Operator::Eq,
                    right,
                }) = part
                else {
                    return Err(format!(
                        "the join condition `{part}` is not an equality of columns"
                    )
                    .into());
                };
                let in_schema = |e: &Expr, s: &DFSchema| {
                    let refs = e.column_refs();
                    !refs.is_empty() && refs.iter().all(|c| s.has_column(c))
                };
                if in_schema(left, ls) && in_schema(right, rs) {
                    pairs.push(((**left).clone(), (**right).clone()));
                } else if in_schema(right, ls) && in_schema(left, rs) {
                    pairs.push(((**right).clone(), (**left).clone()));
                } else {
                    return Err(format!(
                        "the join condition `{part}` does not compare one side with the other"
                    )
                    .into());
                }
            }
        }
        if pairs.is_empty() {
            return Err("joins without an equality between the two sides are recomputed".into());
        }
        let left = self.node(&j.left)?;
        let right = self.node(&j.right)?;
        let mut key_types = Vec::new();
        let mut left_keys = Vec::new();
        let mut right_keys = Vec::new();
        for (l, r) in &pairs {
            let lt = l.get_type(ls).map_err(|e| e.to_string())?;
            let rt = r.get_type(rs).map_err(|e| e.to_string())?;
            let r = if lt == rt {
                r.clone()
            } else {
                r.clone().cast_to(&lt, rs).map_err(|e| e.to_string())?
            };
            left_keys.push(self.physical(l, ls)?);
            right_keys.push(self.physical(&r, rs)?);
            key_types.push(lt);
        }
        // When the right side's key is among the join columns, a left row matches at
        // most one right row, and the left key identifies output rows.
        let right_cols: Vec<usize> = pairs
            .iter()
            .filter_map(|(_, r)| r.try_as_col().and_then(|c| rs.index_of_column(c).ok()))
            .collect();
        let width = ls.fields().len();
        let key = match (&left.key, &right.key) {
            (Some(lk), Some(rk)) if rk.iter().all(|c| right_cols.contains(c)) => Some(lk.clone()),
            (Some(lk), Some(rk)) => Some(
                lk.iter()
                    .copied()
                    .chain(rk.iter().map(|c| c + width))
                    .collect(),
            ),
            _ => None,
        };
        let op = Join::new(
            kind,
            key_types,
            left_keys,
            right_keys,
            &left.schema,
            &right.schema,
            Arc::clone(&schema),
        )
        .map_err(|e| e.to_string())?;
        Ok(Node {
            key,
            append_only: false,
            label: label(plan),
            op: Op::Join {
                left: Box::new(left),
                right: Box::new(right),
                op: Box::new(op),
            },
            schema,
        })
    }

    /// Splits a filter into what does not depend on the time and the conditions on
    /// `now()`, which become a temporal filter. `Err` for a use of the time that is not
    /// a comparison of a row's value with `now()` (plus or minus a constant).
    fn split_temporal(
        &self,
        predicate: &Expr,
        schema: &DFSchema,
    ) -> std::result::Result<(Option<Expr>, Option<TemporalParts>), NotIncremental> {
        let mut plain = Vec::new();
        let mut parts = TemporalParts::default();
        let mut temporal = Vec::new();
        for c in split_conjunction(predicate) {
            if calls_now(c) {
                temporal.push(c.clone());
            } else {
                plain.push(c.clone());
            }
        }
        if temporal.is_empty() {
            return Ok((conjunction(plain), None));
        }
        // `P OR <time condition>`: a row for which P holds is kept whatever the time.
        if let [
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Or,
                right,
            }),
        ] = temporal.as_slice()
        {
            let (p, t) = match (calls_now(left), calls_now(right)) {
                (false, true) => (left, right),
                (true, false) => (right, left),
                _ => {
                    return Err(format!(
                        "`{}` uses now() on both sides of OR; a temporal filter takes \
                         `condition OR <time condition>`",
                        temporal[0]
                    )
                    .into());
                }
            };
            parts.always = Some((**p).clone());
            temporal = split_conjunction(t).into_iter().cloned().collect();
        }
        for c in &temporal {
            bounds_of(c, schema, &mut parts)?;
        }
        Ok((conjunction(plain), Some(parts)))
    }

    /// A temporal filter over `input`, and whether the operator below may forget the
    /// rows it lets go: a `DISTINCT ON` may (a later row for the key starts it afresh),
    /// a GROUP BY only when the time condition reads the group columns alone, since then
    /// a group that has aged out can never show again.
    fn temporal(
        &self,
        plan: &LogicalPlan,
        input: Node,
        parts: TemporalParts,
        in_schema: &DFSchema,
        schema: SchemaRef,
    ) -> std::result::Result<Node, NotIncremental> {
        let bound = |(e, offset): &(Expr, i64)| -> std::result::Result<Bound, NotIncremental> {
            Ok(Bound {
                expr: self.physical(e, in_schema)?,
                offset: *offset,
            })
        };
        let from = parts
            .from
            .iter()
            .map(bound)
            .collect::<Result<Vec<_>, _>>()?;
        let until = parts
            .until
            .iter()
            .map(bound)
            .collect::<Result<Vec<_>, _>>()?;
        let always = match &parts.always {
            Some(p) => Some(self.physical(p, in_schema)?),
            None => None,
        };
        let reads_key_only = || {
            let Some(key) = &input.key else { return false };
            parts
                .from
                .iter()
                .chain(&parts.until)
                .map(|(e, _)| e)
                .chain(&parts.always)
                .flat_map(|e| e.column_refs())
                .all(|c| in_schema.index_of_column(c).is_ok_and(|i| key.contains(&i)))
        };
        let forget_below = match &input.op {
            Op::DistinctOn { .. } => true,
            Op::Aggregate { .. } => reads_key_only(),
            _ => false,
        };
        let mut op =
            Temporal::new(from, until, always, Arc::clone(&schema)).map_err(|e| e.to_string())?;
        // A `DISTINCT ON` holds one row per key and gives it back: keep only keys.
        if let (Op::DistinctOn { .. }, Some(key)) = (&input.op, &input.key) {
            op = op.by_key(key.clone()).map_err(|e| e.to_string())?;
        }
        Ok(Node {
            key: input.key.clone(),
            append_only: false,
            label: label(plan),
            op: Op::Temporal {
                input: Box::new(input),
                op: Box::new(op),
                forget_below,
            },
            schema,
        })
    }

    fn aggregate(
        &self,
        expr: &Expr,
        in_schema: &DFSchema,
        out: DataType,
    ) -> std::result::Result<AggSpec, NotIncremental> {
        let inner = expr.clone().unalias();
        let Expr::AggregateFunction(AggregateFunction { func, params }) = &inner else {
            return Err(format!("`{expr}` is not an aggregate Quiver maintains").into());
        };
        if params.filter.is_some() || !params.order_by.is_empty() {
            return Err(
                format!("`{expr}`: FILTER and ORDER BY in aggregates are recomputed").into(),
            );
        }
        let arg = match params.args.as_slice() {
            [] => Expr::Literal(datafusion::common::ScalarValue::Int64(Some(1)), None),
            [a] => a.clone(),
            _ => return Err(format!("`{expr}` has several arguments").into()),
        };
        let arg_type = arg.get_type(in_schema).map_err(|e| e.to_string())?;
        let num = || Num::of(&arg_type).ok_or_else(|| format!("sums of {arg_type} are recomputed"));
        let kind = match (func.name().to_ascii_lowercase().as_str(), params.distinct) {
            ("count", false) => AggKind::Count,
            ("count", true) => AggKind::CountDistinct,
            ("sum", false) => AggKind::Sum(num()?),
            ("avg", false) => AggKind::Avg(num()?),
            ("min", _) => AggKind::Min,
            ("max", _) => AggKind::Max,
            (name, distinct) => {
                return Err(format!(
                    "{}{name} is not maintained incrementally",
                    if distinct { "DISTINCT " } else { "" }
                )
                .into());
            }
        };
        let arg = self.physical(&arg, in_schema)?;
        AggSpec::new(kind, arg, &arg_type, out).map_err(|e| e.to_string().into())
    }
}

/// The bounds a temporal filter's conditions put on a row's span: expressions over
/// the row, each with microseconds to add.
#[derive(Debug, Default)]
struct TemporalParts {
    from: Vec<(Expr, i64)>,
    until: Vec<(Expr, i64)>,
    always: Option<Expr>,
}

fn is_now(e: &Expr) -> bool {
    matches!(e, Expr::ScalarFunction(f) if f.func.name() == "now")
}

fn calls_now(e: &Expr) -> bool {
    e.exists(|e| Ok(is_now(e))).unwrap_or(false)
}

/// `now()`, `now() + c` or `now() - c` (under casts): the expression to subtract from a
/// row's value to compare it with the time (`c`, `-c`, none).
fn now_shift(e: &Expr) -> Option<Option<(Operator, Expr)>> {
    match e {
        Expr::Cast(c) => now_shift(&c.expr),
        Expr::TryCast(c) => now_shift(&c.expr),
        e if is_now(e) => Some(None),
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus)
                && is_now(strip_casts(left))
                && !calls_now(right)
                && right.column_refs().is_empty() =>
        {
            Some(Some((*op, (**right).clone())))
        }
        _ => None,
    }
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        e => e,
    }
}

/// Adds the bound one condition puts on a row's span: `value OP now() ± c`.
fn bounds_of(
    c: &Expr,
    schema: &DFSchema,
    parts: &mut TemporalParts,
) -> std::result::Result<(), NotIncremental> {
    let unsupported = || -> NotIncremental {
        format!(
            "`{c}` uses now() in a way Quiver does not maintain; a temporal filter compares \
             a row's timestamp with now() plus or minus a constant (>, >=, <, <=, BETWEEN)"
        )
        .into()
    };
    if let Expr::Between(b) = c {
        if b.negated {
            return Err(unsupported());
        }
        let e = *b.expr.clone();
        bounds_of(&e.clone().gt_eq(*b.low.clone()), schema, parts)?;
        return bounds_of(&e.lt_eq(*b.high.clone()), schema, parts);
    }
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = c else {
        return Err(unsupported());
    };
    // As `value OP now() ± c`.
    let (value, op, shift) = match (now_shift(left), now_shift(right)) {
        (None, Some(shift)) if !calls_now(left) => (left, *op, shift),
        (Some(shift), None) if !calls_now(right) => {
            (right, op.swap().ok_or_else(unsupported)?, shift)
        }
        _ => return Err(unsupported()),
    };
    if value.column_refs().is_empty() {
        return Err(unsupported());
    }
    // value OP now + s  ⟺  now OP' value - s: the row's instant is value - s.
    let instant = match shift {
        None => (**value).clone(),
        Some((Operator::Plus, s)) => {
            Expr::BinaryExpr(BinaryExpr::new(value.clone(), Operator::Minus, Box::new(s)))
        }
        Some((_, s)) => {
            Expr::BinaryExpr(BinaryExpr::new(value.clone(), Operator::Plus, Box::new(s)))
        }
    };
    match instant.get_type(schema) {
        Ok(DataType::Timestamp(..) | DataType::Date32 | DataType::Date64) => {}
        Ok(other) => {
            return Err(format!("`{c}` compares {other} with now(); it needs a timestamp").into());
        }
        Err(e) => return Err(format!("`{c}`: {e}").into()),
    }
    match op {
        // value > now - s: holds while now < value + s.
        Operator::Gt => parts.until.push((instant, 0)),
        Operator::GtEq => parts.until.push((instant, 1)),
        // value < now - s: holds once now > value + s.
        Operator::Lt => parts.from.push((instant, 1)),
        Operator::LtEq => parts.from.push((instant, 0)),
        _ => return Err(unsupported()),
    }
    Ok(())
}

/// A GROUP BY node; its key is the group columns.
fn aggregate_node(
    plan: &LogicalPlan,
    input: Node,
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_types: Vec<DataType>,
    specs: Vec<AggSpec>,
    schema: SchemaRef,
) -> std::result::Result<Node, NotIncremental> {
    let n = group_exprs.len();
    let agg = Aggregate::new(
        group_exprs,
        group_types,
        specs,
        input.append_only,
        Arc::clone(&schema),
    )
    .map_err(|e| e.to_string())?;
    Ok(Node {
        key: Some((0..n).collect()),
        append_only: false,
        label: label(plan),
        op: Op::Aggregate {
            input: Box::new(input),
            agg: Box::new(agg),
        },
        schema,
    })
}

#[cfg(test)]
mod tests {
    /// Functions that only exist to be rewritten by a query's optimizer (COALESCE
    /// becomes CASE) must be rewritten for views too, or they fail when evaluated.
    #[test]
    fn expressions_are_simplified_as_a_query_would() {
        use datafusion::logical_expr::{col, lit};
        use datafusion::prelude::SessionContext;
        let ctx = SessionContext::new();
        let state = ctx.state();
        let schema = datafusion::common::DFSchema::try_from(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("a", arrow::datatypes::DataType::Int64, true),
        ]))
        .unwrap();
        let e = datafusion::functions::expr_fn::coalesce(vec![col("a"), lit(0i64)]);
        let c = super::Compiler {
            state: &state,
            source: &|_| None,
        };
        let p = c.physical(&e, &schema).unwrap();
        assert!(
            p.to_string().starts_with("CASE WHEN a@0 IS NOT NULL"),
            "{p}"
        );
    }
}

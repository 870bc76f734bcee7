//! `DISTINCT ON` planned as a window, not as an aggregation.
//!
//! DataFusion turns `SELECT DISTINCT ON (k) a, b … ORDER BY k, t DESC` into a GROUP BY
//! with one `first_value(… ORDER BY t DESC)` per selected column. For text columns those
//! accumulators keep one value object per group, which over millions of keys (the latest
//! state of every order line) is more than ten times slower than sorting. This rule
//! plans the same query as `row_number() OVER (PARTITION BY k ORDER BY k, t DESC) = 1`:
//! a sort-based plan that spills when it must. The result is the same rows in the same
//! order; with ties in the ORDER BY either plan may keep any of the tied rows.

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{Column, Result};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    Distinct, DistinctOn, ExprFunctionExt, LogicalPlan, LogicalPlanBuilder, col, lit,
};
use datafusion::optimizer::AnalyzerRule;

const ROW_NUMBER: &str = "__quiver_distinct_on_row";

/// The analyzer rule; runs after type coercion.
#[derive(Debug, Default)]
pub(crate) struct DistinctOnAsWindow;

impl AnalyzerRule for DistinctOnAsWindow {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::Distinct(Distinct::On(on)) => rewrite(on).map(Transformed::yes),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "quiver_distinct_on_as_window"
    }
}

fn rewrite(on: DistinctOn) -> Result<LogicalPlan> {
    let DistinctOn {
        on_expr,
        select_expr,
        sort_expr,
        input,
        schema,
    } = on;
    let keys = on_expr.len();
    let rank = row_number().partition_by(on_expr);
    let rank = match &sort_expr {
        Some(order) => rank.order_by(order.clone()),
        None => rank,
    }
    .build()?
    .alias(ROW_NUMBER);
    let mut builder = LogicalPlanBuilder::from(input)
        .window(vec![rank])?
        .filter(col(Column::from_name(ROW_NUMBER)).eq(lit(1u64)))?;
    if let Some(mut order) = sort_expr {
        // DISTINCT ON returns its rows in the order of the ON keys.
        order.truncate(keys);
        builder = builder.sort(order)?;
    }
    let projection = select_expr
        .into_iter()
        .zip(schema.iter())
        .map(|(expr, (qualifier, field))| expr.alias_qualified(qualifier.cloned(), field.name()));
    builder.project(projection)?.build()
}

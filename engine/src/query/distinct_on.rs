//! `DISTINCT ON` planned as "the latest row per key", not as an aggregation.
//!
//! DataFusion turns `SELECT DISTINCT ON (k) a, b … ORDER BY k, t DESC` into a GROUP BY
//! with one `first_value(… ORDER BY t DESC)` per selected column. For text columns those
//! accumulators keep one value object per group, which over millions of keys (the latest
//! state of every order line) is more than ten times slower than sorting; a window
//! (`row_number() OVER (PARTITION BY k ORDER BY t DESC) = 1`) sorts every row. This rule
//! plans it as [`LatestPerKey`]: one row per key in a hash table, compared on the
//! ORDER BY (see `latest.rs`), then sorted by the keys. The result is the same rows in
//! the same order; with ties in the ORDER BY any plan may keep any of the tied rows.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::logical_expr::{Distinct, DistinctOn, Extension, LogicalPlan, LogicalPlanBuilder};
use datafusion::optimizer::AnalyzerRule;

use super::latest::LatestPerKey;

/// The analyzer rule; runs after type coercion.
#[derive(Debug, Default)]
pub(crate) struct DistinctOnAsLatest;

impl AnalyzerRule for DistinctOnAsLatest {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|node| match node {
            LogicalPlan::Distinct(Distinct::On(on)) => rewrite(on).map(Transformed::yes),
            other => Ok(Transformed::no(other)),
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "quiver_distinct_on_as_latest"
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
    // The ORDER BY starts with the ON expressions (the planner checks it); within a key
    // they are equal, so the rows are compared on what follows.
    let order = sort_expr
        .as_ref()
        .map(|order| order.iter().skip(keys).cloned().collect())
        .unwrap_or_default();
    let latest = LatestPerKey::new(Arc::unwrap_or_clone(input), on_expr, order);
    let mut builder = LogicalPlanBuilder::from(LogicalPlan::Extension(Extension {
        node: Arc::new(latest),
    }));
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

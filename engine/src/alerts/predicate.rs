//! An alert's predicate, checked against its view's columns when the rule is created
//! and evaluated on the rows of each change set.

use std::sync::Arc;

use arrow::array::{Array, AsArray as _, BooleanArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

/// A compiled predicate over one view's rows.
#[derive(Debug, Clone)]
pub struct Predicate {
    expr: Arc<dyn PhysicalExpr>,
    schema: SchemaRef,
}

impl Predicate {
    /// Compiles `sql` against the view's `schema`; the error names the unknown
    /// column, the type that does not fit, or that the result is not a boolean.
    pub fn compile(sql: &str, view: &str, schema: SchemaRef) -> Result<Self, String> {
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
        let ctx = SessionContext::new();
        let in_view = |e: &dyn std::fmt::Display| format!("predicate on view '{view}': {e}");
        let expr = ctx
            .parse_sql_expr(sql, &df_schema)
            .map_err(|e| in_view(&e))?;
        let physical = ctx
            .create_physical_expr(expr, &df_schema)
            .map_err(|e| in_view(&e))?;
        let ty = physical
            .data_type(schema.as_ref())
            .map_err(|e| in_view(&e))?;
        if ty != DataType::Boolean {
            return Err(in_view(&format!("'{sql}' is {ty}, not true or false")));
        }
        Ok(Self {
            expr: physical,
            schema,
        })
    }

    /// Per row of `rows` (in the view's schema): whether it is in the predicate. A
    /// null answer counts as not in, as in a SQL `WHERE`.
    pub fn matches(&self, rows: &RecordBatch) -> Result<Vec<bool>, String> {
        if rows.schema().fields() != self.schema.fields() {
            return Err("the rows are not in the view's schema".into());
        }
        let value = self.expr.evaluate(rows).map_err(|e| e.to_string())?;
        let array = value
            .into_array(rows.num_rows())
            .map_err(|e| e.to_string())?;
        let bools: &BooleanArray = array.as_boolean();
        Ok((0..bools.len())
            .map(|i| bools.is_valid(i) && bools.value(i))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn low_stock() -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("warehouse_id", DataType::Utf8, false),
            Field::new("on_hand", DataType::Int64, true),
        ]));
        let rows = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from(vec!["A", "B", "C", "D"])),
                Arc::new(StringArray::from(vec!["W1", "W1", "W2", "W1"])),
                Arc::new(Int64Array::from(vec![Some(2), Some(9), Some(1), None])),
            ],
        )
        .unwrap();
        (schema, rows)
    }

    #[test]
    fn rows_in_the_predicate_are_found_and_null_is_not_in() {
        let (schema, rows) = low_stock();
        let p =
            Predicate::compile("on_hand < 5 AND warehouse_id = 'W1'", "low_stock", schema).unwrap();
        assert_eq!(p.matches(&rows).unwrap(), [true, false, false, false]);
    }

    #[test]
    fn bad_predicates_name_the_problem() {
        let (schema, _) = low_stock();
        for (sql, says) in [
            ("quantity < 5", "quantity"),
            ("on_hand + 1", "not true or false"),
            ("on_hand <", "predicate on view 'low_stock'"),
        ] {
            let e = Predicate::compile(sql, "low_stock", Arc::clone(&schema)).expect_err(sql);
            assert!(e.contains(says), "{sql}: {e}");
        }
    }
}

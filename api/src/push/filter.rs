//! Subscription filters: a JSON object of column → condition, checked against a view's
//! schema when a client subscribes and evaluated with Arrow kernels on each change set.
//!
//! ```json
//! {"warehouse_id": "W1", "sku": {"in": ["A", "B"]}, "on_hand": {"gte": 10, "lt": 20}}
//! ```
//!
//! A plain value means equality (`null` means IS NULL). An object holds one or more of
//! `eq`, `ne`, `in`, `gt`, `gte`, `lt`, `lte`; all conditions must hold. Filters are
//! never SQL text.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, Scalar, StringArray,
};
use arrow::compute::kernels::cmp;
use arrow::compute::{CastOptions, and_kleene, cast_with_options, or_kleene};
use arrow::datatypes::{DataType, Schema, TimeUnit};
use arrow::error::ArrowError;
use arrow::util::display::FormatOptions;
use serde_json::{Map, Value};

/// The most values an `in` list may hold.
const MAX_IN_VALUES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

#[derive(Debug)]
enum Cond {
    Cmp(Op, ArrayRef),
    In(Vec<ArrayRef>),
    IsNull,
}

/// Why a subscription's filter was refused: what is wrong and on which column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FilterError {
    #[error("a filter is a JSON object of column → value or condition, not {0}")]
    NotAnObject(&'static str),
    #[error("unknown column '{column}' (the view has {columns})")]
    UnknownColumn { column: String, columns: String },
    #[error("the condition on '{0}' is empty")]
    EmptyCondition(String),
    #[error("'in' on '{0}' takes a JSON array")]
    InNeedsArray(String),
    #[error("'in' on '{column}' has {values} values; the most is {MAX_IN_VALUES}")]
    TooManyValues { column: String, values: usize },
    #[error("unknown condition '{op}' on '{column}' (eq, ne, in, gt, gte, lt, lte)")]
    UnknownCondition { op: String, column: String },
    #[error("'{op}' needs an ordered column; '{column}' is {ty}")]
    NotOrdered {
        op: String,
        column: String,
        ty: DataType,
    },
    #[error("'{column}' is {ty}; {kind} does not fit it")]
    DoesNotFit {
        column: String,
        ty: DataType,
        kind: &'static str,
    },
    #[error("'{shown}' is not a valid {ty} for '{column}': {reason}")]
    Invalid {
        shown: String,
        ty: DataType,
        column: String,
        reason: String,
    },
    #[error("'{0}' cannot hold that value")]
    CannotHold(String),
}

/// A validated filter.
#[derive(Debug)]
pub(crate) struct Filter {
    /// `(column, condition)`, all of which must hold.
    conds: Vec<(String, Cond)>,
    /// Canonical text: equal filters share one group and one encoding.
    canonical: String,
    /// Whether every column the filter reads is a key column.
    on_key_only: bool,
}

impl Filter {
    /// Parses and checks `spec` against `schema`, whose key columns are `key`.
    pub(crate) fn parse(
        spec: Option<&Value>,
        schema: &Schema,
        key: &[String],
    ) -> Result<Self, FilterError> {
        let obj = match spec {
            None | Some(Value::Null) => &Map::new(),
            Some(Value::Object(o)) => o,
            Some(other) => return Err(FilterError::NotAnObject(kind(other))),
        };
        let mut conds = Vec::new();
        for (column, cond) in obj {
            let field = schema.field_with_name(column).map_err(|_| {
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                FilterError::UnknownColumn {
                    column: column.clone(),
                    columns: names.join(", "),
                }
            })?;
            let ty = field.data_type();
            match cond {
                Value::Null => conds.push((column.clone(), Cond::IsNull)),
                Value::Object(ops) => {
                    if ops.is_empty() {
                        return Err(FilterError::EmptyCondition(column.clone()));
                    }
                    for (op, v) in ops {
                        let c = match op.as_str() {
                            "in" => {
                                let list = v
                                    .as_array()
                                    .ok_or_else(|| FilterError::InNeedsArray(column.clone()))?;
                                if list.len() > MAX_IN_VALUES {
                                    return Err(FilterError::TooManyValues {
                                        column: column.clone(),
                                        values: list.len(),
                                    });
                                }
                                Cond::In(
                                    list.iter()
                                        .map(|v| scalar(column, ty, v))
                                        .collect::<Result<_, _>>()?,
                                )
                            }
                            name => {
                                let op = match name {
                                    "eq" => Op::Eq,
                                    "ne" => Op::Ne,
                                    "gt" => Op::Gt,
                                    "gte" => Op::Gte,
                                    "lt" => Op::Lt,
                                    "lte" => Op::Lte,
                                    other => {
                                        return Err(FilterError::UnknownCondition {
                                            op: other.to_owned(),
                                            column: column.clone(),
                                        });
                                    }
                                };
                                if op != Op::Eq && op != Op::Ne && !ordered(ty) {
                                    return Err(FilterError::NotOrdered {
                                        op: name.to_owned(),
                                        column: column.clone(),
                                        ty: ty.clone(),
                                    });
                                }
                                Cond::Cmp(op, scalar(column, ty, v)?)
                            }
                        };
                        conds.push((column.clone(), c));
                    }
                }
                v => conds.push((column.clone(), Cond::Cmp(Op::Eq, scalar(column, ty, v)?))),
            }
        }
        let on_key_only = conds.iter().all(|(c, _)| key.contains(c));
        Ok(Self {
            conds,
            // serde_json's map is ordered by key, so equal filters print the same.
            canonical: Value::Object(obj.clone()).to_string(),
            on_key_only,
        })
    }

    pub(crate) fn canonical(&self) -> &str {
        &self.canonical
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.conds.is_empty()
    }

    pub(crate) fn on_key_only(&self) -> bool {
        self.on_key_only
    }

    /// Which rows of `batch` pass. Rows where a condition is NULL do not.
    pub(crate) fn mask(&self, batch: &RecordBatch) -> Result<BooleanArray, ArrowError> {
        let mut out: Option<BooleanArray> = None;
        for (column, cond) in &self.conds {
            let col = batch.column_by_name(column).ok_or_else(|| {
                ArrowError::SchemaError(format!("the filter's column '{column}' is missing"))
            })?;
            let m = match cond {
                Cond::IsNull => arrow::compute::is_null(col)?,
                Cond::Cmp(op, v) => compare(*op, col, v)?,
                Cond::In(vs) => {
                    let mut any = BooleanArray::from(vec![false; col.len()]);
                    for v in vs {
                        any = or_kleene(&any, &compare(Op::Eq, col, v)?)?;
                    }
                    any
                }
            };
            out = Some(match out {
                None => m,
                Some(prev) => and_kleene(&prev, &m)?,
            });
        }
        Ok(out.unwrap_or_else(|| BooleanArray::from(vec![true; batch.num_rows()])))
    }

    /// The rows of `batch` that pass.
    pub(crate) fn apply(&self, batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        if self.conds.is_empty() {
            return Ok(batch.clone());
        }
        arrow::compute::filter_record_batch(batch, &self.mask(batch)?)
    }
}

fn compare(op: Op, col: &ArrayRef, v: &ArrayRef) -> Result<BooleanArray, ArrowError> {
    let s = Scalar::new(v);
    match op {
        Op::Eq => cmp::eq(col, &s),
        Op::Ne => cmp::neq(col, &s),
        Op::Gt => cmp::gt(col, &s),
        Op::Gte => cmp::gt_eq(col, &s),
        Op::Lt => cmp::lt(col, &s),
        Op::Lte => cmp::lt_eq(col, &s),
    }
}

fn ordered(ty: &DataType) -> bool {
    ty.is_numeric()
        || matches!(
            ty,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Timestamp(..)
                | DataType::Date32
                | DataType::Date64
        )
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One JSON value as a one-element array of the column's type.
fn scalar(column: &str, ty: &DataType, v: &Value) -> Result<ArrayRef, FilterError> {
    let wrong = || FilterError::DoesNotFit {
        column: column.to_owned(),
        ty: ty.clone(),
        kind: kind(v),
    };
    let source: ArrayRef = match (v, ty) {
        (Value::String(s), _) if is_text(ty) => Arc::new(StringArray::from(vec![s.as_str()])),
        (Value::String(s), DataType::Timestamp(..) | DataType::Date32 | DataType::Date64)
        | (Value::String(s), DataType::Decimal128(..) | DataType::Decimal256(..)) => {
            Arc::new(StringArray::from(vec![s.as_str()]))
        }
        (Value::Number(n), DataType::Timestamp(..)) => {
            // Epoch milliseconds, as ingest accepts them.
            let ms = n.as_i64().ok_or_else(wrong)?;
            let a: ArrayRef = Arc::new(Int64Array::from(vec![ms]));
            return cast(
                column,
                &cast(
                    column,
                    &a,
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )?,
                ty,
            );
        }
        (Value::Number(n), _) if ty.is_numeric() => match n.as_i64() {
            Some(i) => Arc::new(Int64Array::from(vec![i])),
            None => Arc::new(Float64Array::from(vec![n.as_f64().ok_or_else(wrong)?])),
        },
        (Value::Bool(b), DataType::Boolean) => Arc::new(BooleanArray::from(vec![*b])),
        _ => return Err(wrong()),
    };
    cast(column, &source, ty)
}

fn is_text(ty: &DataType) -> bool {
    matches!(
        ty,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

fn cast(column: &str, a: &ArrayRef, ty: &DataType) -> Result<ArrayRef, FilterError> {
    let options = CastOptions {
        safe: false,
        format_options: FormatOptions::default(),
    };
    let out = cast_with_options(a, ty, &options).map_err(|e| FilterError::Invalid {
        shown: arrow::util::display::array_value_to_string(a, 0).unwrap_or_default(),
        ty: ty.clone(),
        column: column.to_owned(),
        reason: e.to_string(),
    })?;
    if out.null_count() > 0 {
        return Err(FilterError::CannotHold(column.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::Field;
    use serde_json::json;

    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            Field::new("sku", DataType::Utf8, false),
            Field::new("warehouse_id", DataType::Utf8, false),
            Field::new("on_hand", DataType::Int64, true),
            Field::new("value", DataType::Decimal128(18, 2), true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ])
    }

    fn batch() -> RecordBatch {
        use arrow::array::{Decimal128Array, TimestampMicrosecondArray};
        RecordBatch::try_new(
            Arc::new(schema()),
            vec![
                Arc::new(StringArray::from(vec!["A", "B", "C", "D"])),
                Arc::new(StringArray::from(vec!["W1", "W2", "W1", "W1"])),
                Arc::new(Int64Array::from(vec![Some(5), Some(15), None, Some(25)])),
                Arc::new(
                    Decimal128Array::from(vec![Some(1050), Some(200), None, Some(99)])
                        .with_precision_and_scale(18, 2)
                        .unwrap(),
                ),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![
                        Some(0),
                        Some(60_000_000),
                        None,
                        Some(120_000_000),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn passing(spec: Value) -> Vec<bool> {
        let key = vec!["sku".to_owned(), "warehouse_id".to_owned()];
        let f = Filter::parse(Some(&spec), &schema(), &key).unwrap();
        let m = f.mask(&batch()).unwrap();
        (0..m.len()).map(|i| m.is_valid(i) && m.value(i)).collect()
    }

    #[test]
    fn conditions() {
        assert_eq!(passing(json!({})), [true, true, true, true]);
        assert_eq!(
            passing(json!({"warehouse_id": "W1"})),
            [true, false, true, true]
        );
        assert_eq!(
            passing(json!({"sku": {"in": ["B", "D", "Z"]}})),
            [false, true, false, true]
        );
        assert_eq!(
            passing(json!({"on_hand": {"gte": 5, "lt": 25}})),
            [true, true, false, false]
        );
        assert_eq!(
            passing(json!({"on_hand": null})),
            [false, false, true, false]
        );
        assert_eq!(
            passing(json!({"on_hand": {"ne": 15}})),
            [true, false, false, true]
        );
        assert_eq!(
            passing(json!({"value": {"gt": "1.99"}})),
            [true, true, false, false]
        );
        assert_eq!(
            passing(json!({"value": {"lte": 2}})),
            [false, true, false, true]
        );
        assert_eq!(
            passing(json!({"t": {"gte": "1970-01-01T00:01:00Z"}, "warehouse_id": "W1"})),
            [false, false, false, true]
        );
        assert_eq!(passing(json!({"t": 60000})), [false, true, false, false]);
    }

    #[test]
    fn refusals_say_what_and_where() {
        let key = vec!["sku".to_owned()];
        let err = |spec: Value| {
            Filter::parse(Some(&spec), &schema(), &key)
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({"nope": 1})).contains("unknown column 'nope'"));
        assert!(err(json!({"on_hand": "many"})).contains("'on_hand' is Int64; a string"));
        assert!(
            err(json!({"value": "1.2.3"})).contains("'1.2.3' is not a valid Decimal128(18, 2)")
        );
        assert!(err(json!({"sku": 3})).contains("'sku' is Utf8"));
        assert!(err(json!({"sku": {"like": "A%"}})).contains("unknown condition 'like'"));
        assert!(err(json!({"sku": {"in": "A"}})).contains("JSON array"));
        assert!(err(json!({"sku": {}})).contains("empty"));
        assert!(err(json!("sku = 'A'")).contains("not a string"));
        assert!(err(json!({"t": "yesterday"})).contains("'t'"));
    }

    #[test]
    fn equal_filters_share_a_canonical_form() {
        let key = vec!["sku".to_owned(), "warehouse_id".to_owned()];
        let a = Filter::parse(
            Some(&json!({"sku": "A", "warehouse_id": "W1"})),
            &schema(),
            &key,
        );
        let b = Filter::parse(
            Some(&json!({"warehouse_id": "W1", "sku": "A"})),
            &schema(),
            &key,
        );
        assert_eq!(
            a.as_ref().unwrap().canonical(),
            b.as_ref().unwrap().canonical()
        );
        assert!(a.unwrap().on_key_only());
        let c = Filter::parse(Some(&json!({"on_hand": 1})), &schema(), &key).unwrap();
        assert!(!c.on_key_only());
    }
}

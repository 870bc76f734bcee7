//! Stream schemas: columns, their types and the rules each value must meet.
//!
//! A [`StreamSchema`] describes what producers send (the *input* columns). The stored
//! table adds one derived column, `event_date` (UTC date of `event_time`), which is the
//! Delta partition column.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Name of the derived partition column.
pub const PARTITION_COLUMN: &str = "event_date";
/// Name of the event time column every stream carries.
pub const EVENT_TIME_COLUMN: &str = "event_time";
/// Precision of money columns.
pub const MONEY_PRECISION: u8 = 18;
/// Scale of money columns.
pub const MONEY_SCALE: i8 = 2;

/// The logical type of a stream column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text.
    Utf8,
    /// 64-bit signed integer.
    Int64,
    /// 64-bit float.
    Float64,
    /// Boolean.
    Boolean,
    /// Instant, stored as microseconds since the epoch in UTC.
    Timestamp,
    /// Exact decimal with precision 18 and scale 2.
    Money,
}

impl ColumnType {
    /// The Arrow type values of this column are stored as.
    pub fn arrow_type(self) -> DataType {
        match self {
            Self::Utf8 => DataType::Utf8,
            Self::Int64 => DataType::Int64,
            Self::Float64 => DataType::Float64,
            Self::Boolean => DataType::Boolean,
            Self::Timestamp => timestamp_type(),
            Self::Money => DataType::Decimal128(MONEY_PRECISION, MONEY_SCALE),
        }
    }

    /// The SQL name `CREATE STREAM` accepts and stream definitions are saved with.
    pub fn sql_name(self) -> &'static str {
        match self {
            Self::Utf8 => "text",
            Self::Int64 => "bigint",
            Self::Float64 => "double",
            Self::Boolean => "boolean",
            Self::Timestamp => "timestamp",
            Self::Money => "decimal(18,2)",
        }
    }

    /// A short name for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Utf8 => "string",
            Self::Int64 => "integer",
            Self::Float64 => "number",
            Self::Boolean => "boolean",
            Self::Timestamp => "timestamp (RFC 3339 string or epoch milliseconds)",
            Self::Money => "decimal(18,2)",
        }
    }
}

/// The stored timestamp type: microseconds, UTC.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// A rule a non-null value must meet, beyond its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// No rule.
    None,
    /// Text must not be empty.
    NonEmpty,
    /// Number must be greater than zero.
    Positive,
    /// Number must be zero or more.
    NonNegative,
    /// Number must not be zero.
    NonZero,
    /// Text must be one of these values.
    OneOf(Vec<&'static str>),
}

/// One column of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDef {
    /// Column name.
    pub name: String,
    /// Logical type.
    pub ty: ColumnType,
    /// Whether a value must be present.
    pub required: bool,
    /// Extra rule on present values.
    pub rule: Rule,
}

impl ColumnDef {
    fn new(name: &str, ty: ColumnType, required: bool, rule: Rule) -> Self {
        Self {
            name: name.to_owned(),
            ty,
            required,
            rule,
        }
    }
}

/// The shape of one stream: its name and input columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSchema {
    name: String,
    columns: Vec<ColumnDef>,
    input: SchemaRef,
    stored: SchemaRef,
}

impl StreamSchema {
    /// Builds a schema; `columns` must contain a `event_time` timestamp column.
    pub fn try_new(name: &str, columns: Vec<ColumnDef>) -> crate::Result<Self> {
        if !is_valid_identifier(name) {
            return Err(crate::Error::Config(format!(
                "stream name '{name}' must be lower-case letters, digits and '_', starting with a letter"
            )));
        }
        let has_time = columns
            .iter()
            .any(|c| c.name == EVENT_TIME_COLUMN && c.ty == ColumnType::Timestamp && c.required);
        if !has_time {
            return Err(crate::Error::Config(format!(
                "stream '{name}' needs a required '{EVENT_TIME_COLUMN}' timestamp column"
            )));
        }
        if let Some(c) = columns.iter().find(|c| c.name == PARTITION_COLUMN) {
            return Err(crate::Error::Config(format!(
                "stream '{name}': '{}' is derived from event_time and cannot be declared",
                c.name
            )));
        }
        if let Some(c) = columns.iter().find(|c| !is_valid_identifier(&c.name)) {
            return Err(crate::Error::Config(format!(
                "stream '{name}': column name '{}' must be lower-case letters, digits and '_', starting with a letter",
                c.name
            )));
        }
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| Field::new(&c.name, c.ty.arrow_type(), !c.required))
            .collect();
        let input = Arc::new(Schema::new(fields.clone()));
        let mut stored_fields = fields;
        stored_fields.push(Field::new(PARTITION_COLUMN, DataType::Date32, false));
        let stored = Arc::new(Schema::new(stored_fields));
        Ok(Self {
            name: name.to_owned(),
            columns,
            input,
            stored,
        })
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The input columns, in order.
    pub fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    /// Looks a column up by name.
    pub fn column(&self, name: &str) -> Option<(usize, &ColumnDef)> {
        self.columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
    }

    /// Arrow schema of what producers send.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input
    }

    /// Arrow schema of the stored table (input columns plus `event_date`).
    pub fn stored_schema(&self) -> &SchemaRef {
        &self.stored
    }

    /// The built-in `orders` stream.
    pub fn orders() -> Self {
        use ColumnType::*;
        let cols = vec![
            ColumnDef::new("event_id", Utf8, true, Rule::NonEmpty),
            ColumnDef::new("event_time", Timestamp, true, Rule::None),
            ColumnDef::new("order_id", Utf8, true, Rule::None),
            ColumnDef::new("customer_id", Utf8, true, Rule::None),
            ColumnDef::new("warehouse_id", Utf8, true, Rule::None),
            ColumnDef::new("sku", Utf8, true, Rule::None),
            ColumnDef::new("quantity", Int64, true, Rule::Positive),
            ColumnDef::new("unit_price", Money, true, Rule::NonNegative),
            ColumnDef::new("status", Utf8, true, Rule::OneOf(ORDER_STATUSES.to_vec())),
            ColumnDef::new("channel", Utf8, false, Rule::None),
        ];
        Self::try_new("orders", cols).expect("built-in schema is valid")
    }

    /// The built-in `inventory` stream.
    pub fn inventory() -> Self {
        use ColumnType::*;
        let cols = vec![
            ColumnDef::new("event_id", Utf8, true, Rule::NonEmpty),
            ColumnDef::new("event_time", Timestamp, true, Rule::None),
            ColumnDef::new("sku", Utf8, true, Rule::None),
            ColumnDef::new("warehouse_id", Utf8, true, Rule::None),
            ColumnDef::new("kind", Utf8, true, Rule::OneOf(INVENTORY_KINDS.to_vec())),
            ColumnDef::new("quantity", Int64, true, Rule::NonZero),
            ColumnDef::new("unit_cost", Money, false, Rule::NonNegative),
        ];
        Self::try_new("inventory", cols).expect("built-in schema is valid")
    }
}

/// Allowed `orders.status` values.
pub const ORDER_STATUSES: [&str; 6] = [
    "created",
    "paid",
    "shipped",
    "delivered",
    "cancelled",
    "returned",
];

/// Allowed `inventory.kind` values.
pub const INVENTORY_KINDS: [&str; 6] = [
    "receipt",
    "sale",
    "return",
    "adjustment",
    "transfer_in",
    "transfer_out",
];

/// Whether `name` is a safe stream or view name (also used in storage paths).
pub fn is_valid_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_schemas_have_partition_column() {
        let s = StreamSchema::orders();
        assert_eq!(s.stored_schema().fields().len(), s.columns().len() + 1);
        assert_eq!(
            s.stored_schema()
                .field_with_name("unit_price")
                .unwrap()
                .data_type(),
            &DataType::Decimal128(18, 2)
        );
        assert!(
            !s.input_schema()
                .field_with_name("sku")
                .unwrap()
                .is_nullable()
        );
        assert!(
            s.input_schema()
                .field_with_name("channel")
                .unwrap()
                .is_nullable()
        );
    }

    #[test]
    fn identifiers() {
        assert!(is_valid_identifier("orders_2"));
        assert!(!is_valid_identifier("../etc"));
        assert!(!is_valid_identifier("Orders"));
        assert!(!is_valid_identifier(""));
    }
}

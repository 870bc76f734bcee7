//! Request bodies to Arrow batches: NDJSON, JSON arrays, CSV with a header, Arrow IPC.
//!
//! Every row is checked against the stream's schema (types, required columns, unknown
//! columns, rules); a body with any bad row is refused whole, and the error lists each
//! problem with its row and column.

use std::borrow::Cow;
use std::fmt;
use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray, new_null_array,
};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::DataType;
use arrow::ipc::reader::StreamReader;
use arrow::record_batch::RecordBatch;
use quiver_engine::{ColumnType, StreamSchema};
use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::{Error, Problems, Result};
use crate::value::{ColumnBuilder, Lexical, Scalar, check_rule, parse};

/// A body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`application/x-ndjson`).
    Ndjson,
    /// A JSON array of objects (`application/json`).
    Json,
    /// CSV with a header row (`text/csv`).
    Csv,
    /// Arrow IPC stream (`application/vnd.apache.arrow.stream`).
    ArrowIpc,
}

impl Format {
    /// The format for a `Content-Type` value (parameters such as `charset` are ignored).
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                Some(Self::Ndjson)
            }
            "application/json" => Some(Self::Json),
            "text/csv" => Some(Self::Csv),
            "application/vnd.apache.arrow.stream" => Some(Self::ArrowIpc),
            _ => None,
        }
    }

    /// The canonical content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Ndjson => "application/x-ndjson",
            Self::Json => "application/json",
            Self::Csv => "text/csv",
            Self::ArrowIpc => "application/vnd.apache.arrow.stream",
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ndjson => "ndjson",
            Self::Json => "json",
            Self::Csv => "csv",
            Self::ArrowIpc => "arrow",
        }
    }
}

/// A format name that is none of [`Format`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format '{0}' (ndjson, json, csv, arrow)")]
pub struct UnknownFormat(pub String);

impl std::str::FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownFormat> {
        match s {
            "ndjson" => Ok(Self::Ndjson),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            "arrow" => Ok(Self::ArrowIpc),
            other => Err(UnknownFormat(other.to_owned())),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes and validates `body` for `schema`; the batch has the stream's input schema.
pub fn decode(schema: &StreamSchema, format: Format, body: &[u8]) -> Result<RecordBatch> {
    match format {
        Format::Ndjson => decode_ndjson(schema, body),
        Format::Json => decode_json_array(schema, body),
        Format::Csv => decode_csv(schema, body),
        Format::ArrowIpc => decode_arrow(schema, body),
    }
}

/// Builds columns row by row and checks each value as it goes.
struct Rows<'s> {
    schema: &'s StreamSchema,
    builders: Vec<ColumnBuilder>,
    seen: Vec<bool>,
    problems: Problems,
    rows: usize,
}

impl<'s> Rows<'s> {
    fn new(schema: &'s StreamSchema, capacity: usize) -> Self {
        Self {
            schema,
            builders: schema
                .columns()
                .iter()
                .map(|c| ColumnBuilder::new(c.ty, capacity))
                .collect(),
            seen: vec![false; schema.columns().len()],
            problems: Problems::default(),
            rows: 0,
        }
    }

    fn begin_row(&mut self) {
        self.seen.iter_mut().for_each(|s| *s = false);
    }

    /// Resolves a field name to its column, reporting unknown and repeated names.
    fn column(&mut self, row: usize, name: &str) -> Option<usize> {
        match self.schema.column(name) {
            None => {
                self.problems.push(row, Some(name), "unknown column");
                None
            }
            Some((idx, _)) if self.seen[idx] => {
                self.problems
                    .push(row, Some(name), "column appears twice in the row");
                None
            }
            Some((idx, _)) => {
                self.seen[idx] = true;
                Some(idx)
            }
        }
    }

    /// Parses one value into column `idx`; `None` text is an explicit null.
    fn value(&mut self, row: usize, idx: usize, text: Option<&str>, lex: Lexical, strict: bool) {
        let col = &self.schema.columns()[idx];
        let parsed = match text {
            None => {
                if col.required {
                    self.problems
                        .push(row, Some(&col.name), "required value is null");
                }
                None
            }
            Some(t) => match parse(col.ty, t, lex, strict) {
                Ok(v) => {
                    if let Some(reason) = check_rule(&col.rule, v) {
                        self.problems.push(row, Some(&col.name), reason);
                    }
                    Some(v)
                }
                Err(reason) => {
                    self.problems.push(row, Some(&col.name), reason);
                    None
                }
            },
        };
        self.builders[idx].push(parsed);
    }

    fn end_row(&mut self, row: usize) {
        for (idx, col) in self.schema.columns().iter().enumerate() {
            if !self.seen[idx] {
                if col.required {
                    self.problems
                        .push(row, Some(&col.name), "required column is missing");
                }
                self.builders[idx].push(None);
            }
        }
        self.rows += 1;
    }

    fn finish(self) -> Result<RecordBatch> {
        if self.problems.is_empty() && self.rows == 0 {
            return Err(Error::Empty);
        }
        let columns: Vec<ArrayRef> = self.builders.into_iter().map(|b| b.finish()).collect();
        let problems = self.problems;
        if !problems.is_empty() {
            return problems.into_result(RecordBatch::new_empty(Arc::clone(
                self.schema.input_schema(),
            )));
        }
        RecordBatch::try_new(Arc::clone(self.schema.input_schema()), columns).map_err(|e| {
            Error::Malformed {
                format: "internal",
                message: e.to_string(),
            }
        })
    }

    /// Adds one JSON object's fields.
    fn json_object(&mut self, row: usize, fields: &[(&str, &RawValue)]) {
        self.begin_row();
        for (name, raw) in fields {
            let Some(idx) = self.column(row, name) else {
                continue;
            };
            let text = raw.get();
            match text.as_bytes().first() {
                Some(b'n') => self.value(row, idx, None, Lexical::Text, true),
                Some(b'"') => match unquote(text) {
                    Some(s) => self.value(row, idx, Some(&s), Lexical::Text, true),
                    None => {
                        let col = &self.schema.columns()[idx].name;
                        self.problems.push(row, Some(col), "bad string escape");
                        self.builders[idx].push(None);
                    }
                },
                Some(b't' | b'f') => self.value(row, idx, Some(text), Lexical::Bool, true),
                Some(b'{' | b'[') => self.value(row, idx, Some(text), Lexical::Nested, true),
                _ => self.value(row, idx, Some(text), Lexical::Number, true),
            }
        }
        self.end_row(row);
    }
}

fn unquote(text: &str) -> Option<Cow<'_, str>> {
    let inner = text.get(1..text.len().saturating_sub(1))?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// Deserializes one JSON object into a reused list of (name, raw value).
struct FieldsSeed<'v, 'de>(&'v mut Vec<(&'de str, &'de RawValue)>);

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<&'de str>()? {
            let value: &'de RawValue = map.next_value()?;
            self.0.push((key, value));
        }
        Ok(())
    }
}

fn parse_object<'de>(
    text: &'de [u8],
    fields: &mut Vec<(&'de str, &'de RawValue)>,
) -> serde_json::Result<()> {
    fields.clear();
    let mut de = serde_json::Deserializer::from_slice(text);
    FieldsSeed(fields)
        .deserialize(&mut de)
        .and_then(|()| de.end())
}

fn decode_ndjson(schema: &StreamSchema, body: &[u8]) -> Result<RecordBatch> {
    let estimate = memchr::memchr_iter(b'\n', body).count() + 1;
    let mut rows = Rows::new(schema, estimate);
    let mut fields = Vec::with_capacity(schema.columns().len());
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match parse_object(line, &mut fields) {
            Ok(()) => rows.json_object(line_no, &fields),
            Err(e) => rows
                .problems
                .push(line_no, None, format!("malformed JSON: {e}")),
        }
    }
    rows.finish()
}

fn decode_json_array(schema: &StreamSchema, body: &[u8]) -> Result<RecordBatch> {
    let elements: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| Error::Malformed {
        format: "json",
        message: format!("{e} (expected a JSON array of objects)"),
    })?;
    let mut rows = Rows::new(schema, elements.len());
    let mut fields = Vec::with_capacity(schema.columns().len());
    for (i, el) in elements.iter().enumerate() {
        match parse_object(el.get().as_bytes(), &mut fields) {
            Ok(()) => rows.json_object(i + 1, &fields),
            Err(e) => rows
                .problems
                .push(i + 1, None, format!("malformed JSON: {e}")),
        }
    }
    rows.finish()
}

fn decode_csv(schema: &StreamSchema, body: &[u8]) -> Result<RecordBatch> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| Error::Malformed {
            format: "csv",
            message: format!("cannot read the header row: {e}"),
        })?
        .clone();
    let mut rows = Rows::new(schema, 1024);
    // Resolve the header once: position → column index.
    rows.begin_row();
    let mapping: Vec<Option<usize>> = headers.iter().map(|h| rows.column(0, h.trim())).collect();
    for (idx, col) in schema.columns().iter().enumerate() {
        if col.required && !rows.seen[idx] {
            rows.problems.push(
                0,
                Some(&col.name),
                "required column is missing from the header",
            );
        }
    }
    if !rows.problems.is_empty() {
        return rows
            .problems
            .into_result(RecordBatch::new_empty(Arc::clone(schema.input_schema())));
    }
    let header_seen = rows.seen.clone();
    let mut record = csv::StringRecord::new();
    let mut row = 0;
    loop {
        row += 1;
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                for (pos, field) in record.iter().enumerate() {
                    if let Some(Some(idx)) = mapping.get(pos) {
                        let text = (!field.is_empty()).then_some(field);
                        rows.value(row, *idx, text, Lexical::Text, false);
                    }
                }
                // Optional columns the header lacks are null in every row.
                for (idx, seen) in header_seen.iter().enumerate() {
                    if !seen {
                        rows.builders[idx].push(None);
                    }
                }
                rows.rows += 1;
            }
            Err(e) => {
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("has {len} fields, the header has {expected_len}")
                    }
                    csv::ErrorKind::Utf8 { .. } => "is not valid UTF-8".to_owned(),
                    _ => e.to_string(),
                };
                rows.problems.push(row, None, reason);
            }
        }
    }
    rows.finish()
}

fn decode_arrow(schema: &StreamSchema, body: &[u8]) -> Result<RecordBatch> {
    let malformed = |e: arrow::error::ArrowError| Error::Malformed {
        format: "arrow",
        message: e.to_string(),
    };
    let reader = StreamReader::try_new(Cursor::new(body), None).map_err(malformed)?;
    let incoming = reader.schema();
    let mut problems = Problems::default();
    let mut sources: Vec<Option<usize>> = vec![None; schema.columns().len()];
    for (pos, field) in incoming.fields().iter().enumerate() {
        match schema.column(field.name()) {
            None => problems.push(0, Some(field.name()), "unknown column"),
            Some((idx, _)) if sources[idx].is_some() => {
                problems.push(0, Some(field.name()), "column appears twice")
            }
            Some((idx, col)) => {
                if !castable(field.data_type(), col.ty) {
                    problems.push(
                        0,
                        Some(field.name()),
                        format!(
                            "arrow type {} cannot hold {}",
                            field.data_type(),
                            col.ty.name()
                        ),
                    );
                }
                sources[idx] = Some(pos);
            }
        }
    }
    for (idx, col) in schema.columns().iter().enumerate() {
        if col.required && sources[idx].is_none() {
            problems.push(0, Some(&col.name), "required column is missing");
        }
    }
    if !problems.is_empty() {
        return problems.into_result(RecordBatch::new_empty(Arc::clone(schema.input_schema())));
    }
    let mut out = Vec::new();
    let mut offset = 0usize;
    for batch in reader {
        let batch = batch.map_err(malformed)?;
        let mut columns = Vec::with_capacity(schema.columns().len());
        for (idx, col) in schema.columns().iter().enumerate() {
            let target = col.ty.arrow_type();
            let array = match sources[idx] {
                None => new_null_array(&target, batch.num_rows()),
                Some(pos) => convert(batch.column(pos), col.ty).map_err(malformed)?,
            };
            if let Some(pos) = sources[idx] {
                let src = batch.column(pos);
                for r in 0..array.len() {
                    if array.is_null(r) && src.is_valid(r) {
                        problems.push(
                            offset + r + 1,
                            Some(&col.name),
                            format!("value cannot be read as {}", col.ty.name()),
                        );
                    }
                }
            }
            check_array(&array, col, offset, &mut problems);
            columns.push(array);
        }
        offset += batch.num_rows();
        if problems.is_empty() {
            out.push(
                RecordBatch::try_new(Arc::clone(schema.input_schema()), columns)
                    .map_err(malformed)?,
            );
        }
    }
    if problems.is_empty() && offset == 0 {
        return Err(Error::Empty);
    }
    problems.into_result(())?;
    arrow::compute::concat_batches(schema.input_schema(), &out).map_err(malformed)
}

fn castable(from: &DataType, to: ColumnType) -> bool {
    use DataType::*;
    let from = match from {
        Dictionary(_, v) => v.as_ref(),
        other => other,
    };
    match to {
        ColumnType::Utf8 => matches!(from, Utf8 | LargeUtf8 | Utf8View | Null),
        ColumnType::Int64 => from.is_integer() || matches!(from, Null),
        ColumnType::Float64 => from.is_numeric() || matches!(from, Null),
        ColumnType::Boolean => matches!(from, Boolean | Null),
        ColumnType::Timestamp => matches!(
            from,
            Timestamp(_, _) | Int64 | Utf8 | LargeUtf8 | Utf8View | Null
        ),
        ColumnType::Money => {
            matches!(
                from,
                Decimal128(_, _) | Decimal256(_, _) | Utf8 | LargeUtf8 | Utf8View | Null
            ) || from.is_integer()
        }
    }
}

/// Converts a source array to the column's stored type; values that cannot convert
/// become nulls (the caller reports them).
fn convert(
    src: &ArrayRef,
    ty: ColumnType,
) -> std::result::Result<ArrayRef, arrow::error::ArrowError> {
    let target = ty.arrow_type();
    let options = CastOptions {
        safe: true,
        ..CastOptions::default()
    };
    if ty == ColumnType::Timestamp && src.data_type().is_integer() {
        // Integers are epoch milliseconds, as in JSON.
        let ms = cast_with_options(src, &DataType::Int64, &options)?;
        let ms = ms
            .as_any()
            .downcast_ref::<Int64Array>()
            .cloned()
            .unwrap_or_else(|| Int64Array::from(Vec::<i64>::new()));
        let us: TimestampMicrosecondArray = ms
            .iter()
            .map(|v| v.and_then(|v| v.checked_mul(1000)))
            .collect();
        return Ok(Arc::new(us.with_timezone("UTC")));
    }
    if ty == ColumnType::Money
        && matches!(
            src.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        )
    {
        let text = cast_with_options(src, &DataType::Utf8, &options)?;
        let text = text
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .unwrap_or_else(|| StringArray::from(Vec::<String>::new()));
        let cents: Decimal128Array = text
            .iter()
            .map(|v| v.and_then(|s| crate::value::parse_money(s.trim()).ok()))
            .collect();
        return Ok(Arc::new(cents.with_precision_and_scale(18, 2)?));
    }
    cast_with_options(src, &target, &options)
}

/// Checks required values and rules on a converted array.
fn check_array(
    array: &ArrayRef,
    col: &quiver_engine::ColumnDef,
    offset: usize,
    problems: &mut Problems,
) {
    let any = array.as_any();
    for r in 0..array.len() {
        let row = offset + r + 1;
        if array.is_null(r) {
            if col.required {
                problems.push(row, Some(&col.name), "required value is null");
            }
            continue;
        }
        let v = match col.ty {
            ColumnType::Utf8 => any
                .downcast_ref::<StringArray>()
                .map(|a| Scalar::Str(a.value(r))),
            ColumnType::Int64 => any
                .downcast_ref::<Int64Array>()
                .map(|a| Scalar::Int(a.value(r))),
            ColumnType::Float64 => any
                .downcast_ref::<Float64Array>()
                .map(|a| Scalar::Float(a.value(r))),
            ColumnType::Boolean => any
                .downcast_ref::<BooleanArray>()
                .map(|a| Scalar::Bool(a.value(r))),
            ColumnType::Timestamp => any
                .downcast_ref::<TimestampMicrosecondArray>()
                .map(|a| Scalar::Micros(a.value(r))),
            ColumnType::Money => any
                .downcast_ref::<Decimal128Array>()
                .map(|a| Scalar::Cents(a.value(r))),
        };
        if let Some(v) = v
            && let Some(reason) = check_rule(&col.rule, v)
        {
            problems.push(row, Some(&col.name), reason);
        }
    }
}

#[cfg(test)]
mod tests;

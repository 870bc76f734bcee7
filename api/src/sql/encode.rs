//! Result encodings of `POST /v1/sql`, written batch by batch so a result streams out.
//!
//! Text formats show instants as RFC 3339 in UTC (`2026-11-25T10:00:00.5Z`); JSON gives
//! decimals as strings so no digit is lost to a float parser. Arrow and Parquet carry the
//! Arrow types as they are.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef};
use arrow::error::ArrowError;
use arrow::ipc::writer::StreamWriter;
use arrow::json::writer::{Encoder, EncoderFactory, EncoderOptions, NullableEncoder, make_encoder};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use quiver_engine::QueryError;
use quiver_engine::query::{cast_batch, retype_text};
use serde_json::json;

/// chrono format of UTC instants in text results.
const UTC_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.fZ";
/// Parquet row groups are closed at about this many bytes, so memory stays bounded.
const PARQUET_ROW_GROUP_BYTES: usize = 16 << 20;

/// A result encoding, chosen with `?format=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::EnumString)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub(crate) enum ResultFormat {
    Json,
    #[strum(serialize = "ndjson", serialize = "jsonl")]
    Ndjson,
    Csv,
    Arrow,
    Parquet,
}

impl ResultFormat {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        name.parse().ok()
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Ndjson => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Arrow => "application/vnd.apache.arrow.stream",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// The SQL name of an Arrow type, as result columns are described.
pub(crate) fn type_name(ty: &DataType) -> String {
    match ty {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Int8 => "tinyint".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => "integer unsigned".into(),
        DataType::UInt64 => "bigint unsigned".into(),
        DataType::Float16 | DataType::Float32 => "real".into(),
        DataType::Float64 => "double".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Time32(_) | DataType::Time64(_) => "time".into(),
        DataType::Interval(_) => "interval".into(),
        DataType::Duration(_) => "duration".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytea".into(),
        DataType::Null => "null".into(),
        DataType::Dictionary(_, v) => type_name(v),
        other => other.to_string(),
    }
}

/// Turns result batches into bytes of one format.
pub(crate) struct ResultEncoder {
    schema: SchemaRef,
    state: State,
    json_options: EncoderOptions,
}

enum State {
    Json { rows: u64 },
    Ndjson,
    Csv { header_written: bool },
    Arrow(Box<StreamWriter<Vec<u8>>>),
    Parquet(Box<ArrowWriter<Vec<u8>>>),
}

impl std::fmt::Debug for ResultEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultEncoder")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl ResultEncoder {
    /// Starts a result of `schema`; returns the encoder and the bytes that open it.
    pub(crate) fn start(
        format: ResultFormat,
        schema: SchemaRef,
    ) -> Result<(Self, Bytes), ArrowError> {
        // Binary formats carry text as plain Utf8: string views are an engine detail
        // that older Arrow and Parquet readers do not know.
        let schema = match format {
            ResultFormat::Arrow | ResultFormat::Parquet => {
                retype_text(&schema, &DataType::Utf8View, DataType::Utf8)
            }
            _ => schema,
        };
        let json_options = json_options();
        let (state, head) = match format {
            ResultFormat::Json => {
                let columns: Vec<_> = schema
                    .fields()
                    .iter()
                    .map(|f| json!({"name": f.name(), "type": type_name(f.data_type())}))
                    .collect();
                let head = format!(
                    "{{\"columns\":{},\"rows\":[",
                    serde_json::Value::Array(columns)
                );
                (State::Json { rows: 0 }, Bytes::from(head))
            }
            ResultFormat::Ndjson => (State::Ndjson, Bytes::new()),
            ResultFormat::Csv => (
                State::Csv {
                    header_written: false,
                },
                Bytes::new(),
            ),
            ResultFormat::Arrow => {
                let mut w = StreamWriter::try_new(Vec::new(), &schema)?;
                let head = Bytes::from(std::mem::take(w.get_mut()));
                (State::Arrow(Box::new(w)), head)
            }
            ResultFormat::Parquet => {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let w = ArrowWriter::try_new(Vec::new(), Arc::clone(&schema), Some(props))
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                (State::Parquet(Box::new(w)), Bytes::new())
            }
        };
        Ok((
            Self {
                schema,
                state,
                json_options,
            },
            head,
        ))
    }

    /// Encodes one batch.
    pub(crate) fn batch(&mut self, batch: &RecordBatch) -> Result<Bytes, ArrowError> {
        let mut out = Vec::new();
        match &mut self.state {
            State::Json { rows } => {
                let batch = utc_timestamps(batch)?;
                write_rows(
                    &batch,
                    &self.json_options,
                    &mut out,
                    *rows > 0,
                    RowShape::Array,
                )?;
                *rows += batch.num_rows() as u64;
            }
            State::Ndjson => {
                let batch = utc_timestamps(batch)?;
                write_rows(
                    &batch,
                    &self.json_options,
                    &mut out,
                    false,
                    RowShape::Object,
                )?;
            }
            State::Csv { header_written } => {
                let batch = utc_timestamps(batch)?;
                write_csv(&batch, &mut out, !*header_written)?;
                *header_written = true;
            }
            State::Arrow(w) => {
                w.write(&cast_batch(batch, &self.schema)?)?;
                out = std::mem::take(w.get_mut());
            }
            State::Parquet(w) => {
                w.write(batch)
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                if w.in_progress_size() >= PARQUET_ROW_GROUP_BYTES {
                    w.flush()
                        .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                }
                out = std::mem::take(w.inner_mut());
            }
        }
        Ok(Bytes::from(out))
    }

    /// Closes the result.
    pub(crate) fn finish(&mut self) -> Result<Bytes, ArrowError> {
        let mut out = Vec::new();
        match &mut self.state {
            State::Json { .. } => out.extend_from_slice(b"]}"),
            State::Ndjson => {}
            State::Csv { header_written } => {
                if !*header_written {
                    let empty = RecordBatch::new_empty(Arc::clone(&self.schema));
                    let empty = utc_timestamps(&empty)?;
                    write_csv(&empty, &mut out, true)?;
                    *header_written = true;
                }
            }
            State::Arrow(w) => {
                w.finish()?;
                out = std::mem::take(w.get_mut());
            }
            State::Parquet(w) => {
                w.finish()
                    .map_err(|e| ArrowError::ExternalError(Box::new(e)))?;
                out = std::mem::take(w.inner_mut());
            }
        }
        Ok(Bytes::from(out))
    }

    /// Bytes that end a text result with the error that cut it short, when the format
    /// can carry one (JSON: an `"error"` member; NDJSON: a last `{"error": …}` line).
    /// Binary formats have no such place; their transfer is aborted instead.
    pub(crate) fn fail(&self, error: &QueryError) -> Option<Bytes> {
        let err = json!({"code": error.code(), "message": error.to_string()});
        match self.state {
            State::Json { .. } => Some(Bytes::from(format!("],\"error\":{err}}}"))),
            State::Ndjson => Some(Bytes::from(format!("{}\n", json!({"error": err})))),
            _ => None,
        }
    }
}

/// A batch as the JSON result shape: `{"columns": [{"name", "type"}], "rows": [[…]]}`.
pub(crate) fn json_result(batch: &RecordBatch) -> Result<serde_json::Value, ArrowError> {
    let (mut encoder, head) = ResultEncoder::start(ResultFormat::Json, batch.schema())?;
    let mut out = head.to_vec();
    out.extend_from_slice(&encoder.batch(batch)?);
    out.extend_from_slice(&encoder.finish()?);
    serde_json::from_slice(&out).map_err(|e| ArrowError::ExternalError(Box::new(e)))
}

/// How JSON results write values: explicit nulls, UTC timestamps, decimals as strings.
fn json_options() -> EncoderOptions {
    EncoderOptions::default()
        .with_explicit_nulls(true)
        .with_timestamp_tz_format(UTC_FORMAT.to_owned())
        .with_encoder_factory(Arc::new(DecimalAsString))
}

/// Rows as JSON arrays, valued as the JSON result writes them, joined by commas.
#[derive(Debug, Default)]
pub(crate) struct JsonRows {
    /// `[…],[…],…`
    pub(crate) text: Bytes,
    /// Where each row ends in `text` (the next starts one byte later, after the comma).
    pub(crate) ends: Vec<usize>,
}

impl JsonRows {
    pub(crate) fn encode(batch: &RecordBatch) -> Result<Self, ArrowError> {
        let mut text = Vec::new();
        let mut ends = Vec::new();
        if batch.num_rows() > 0 {
            let batch = utc_timestamps(batch)?;
            write_rows_to(
                &batch,
                &json_options(),
                &mut text,
                false,
                RowShape::Array,
                Some(&mut ends),
            )?;
        }
        Ok(Self {
            text: Bytes::from(text),
            ends,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// Row `i`'s text.
    pub(crate) fn row(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] + 1 };
        &self.text[start..self.ends[i]]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RowShape {
    Array,
    Object,
}

/// Writes rows as JSON: `[v, …]` separated by commas, or `{"col": v, …}` lines.
fn write_rows(
    batch: &RecordBatch,
    options: &EncoderOptions,
    out: &mut Vec<u8>,
    continues: bool,
    shape: RowShape,
) -> Result<(), ArrowError> {
    write_rows_to(batch, options, out, continues, shape, None)
}

/// [`write_rows`], noting where each row ends when `ends` is given.
fn write_rows_to(
    batch: &RecordBatch,
    options: &EncoderOptions,
    out: &mut Vec<u8>,
    continues: bool,
    shape: RowShape,
    mut ends: Option<&mut Vec<usize>>,
) -> Result<(), ArrowError> {
    let schema = batch.schema();
    let mut encoders = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(field, column)| make_encoder(field, column.as_ref(), options))
        .collect::<Result<Vec<NullableEncoder<'_>>, _>>()?;
    let keys: Vec<Vec<u8>> = schema
        .fields()
        .iter()
        .map(|f| {
            let mut k = serde_json::to_vec(f.name()).unwrap_or_default();
            k.push(b':');
            k
        })
        .collect();
    for row in 0..batch.num_rows() {
        match shape {
            RowShape::Array => {
                if continues || row > 0 {
                    out.push(b',');
                }
                out.push(b'[');
            }
            RowShape::Object => out.push(b'{'),
        }
        for (i, encoder) in encoders.iter_mut().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            if shape == RowShape::Object {
                out.extend_from_slice(&keys[i]);
            }
            if encoder.is_null(row) {
                out.extend_from_slice(b"null");
            } else {
                encoder.encode(row, out);
            }
        }
        match shape {
            RowShape::Array => out.push(b']'),
            RowShape::Object => out.extend_from_slice(b"}\n"),
        }
        if let Some(ends) = ends.as_deref_mut() {
            ends.push(out.len());
        }
    }
    Ok(())
}

fn write_csv(batch: &RecordBatch, out: &mut Vec<u8>, header: bool) -> Result<(), ArrowError> {
    let mut w = arrow::csv::WriterBuilder::new()
        .with_header(header)
        .with_timestamp_tz_format(UTC_FORMAT.to_owned())
        .build(out);
    w.write(batch)
}

/// Gives every zoned timestamp column the UTC zone (the same instants), so text formats
/// print them as `…Z`.
fn utc_timestamps(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let zoned = |f: &FieldRef| matches!(f.data_type(), DataType::Timestamp(_, Some(tz)) if tz.as_ref() != "UTC");
    if !schema.fields().iter().any(zoned) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if let DataType::Timestamp(unit, Some(_)) = field.data_type() {
            let ty = DataType::Timestamp(*unit, Some("UTC".into()));
            columns.push(arrow::compute::cast(column, &ty)?);
            fields.push(Field::new(field.name(), ty, field.is_nullable()));
        } else {
            columns.push(Arc::clone(column));
            fields.push(field.as_ref().clone());
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// JSON encoder factory: decimals as strings, e.g. `"12.50"`.
#[derive(Debug)]
struct DecimalAsString;

impl EncoderFactory for DecimalAsString {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> Result<Option<NullableEncoder<'a>>, ArrowError> {
        if !matches!(
            array.data_type(),
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
        ) {
            return Ok(None);
        }
        let formatter = ArrayFormatter::try_new(array, &FormatOptions::default())?;
        Ok(Some(NullableEncoder::new(
            Box::new(QuotedDecimal(formatter)),
            array.nulls().cloned(),
        )))
    }
}

struct QuotedDecimal<'a>(ArrayFormatter<'a>);

impl Encoder for QuotedDecimal<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        use std::io::Write;
        let _ = write!(out, "\"{}\"", self.0.value(idx));
    }
}

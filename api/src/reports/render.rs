//! Writing a report's file from its queries' Arrow results, one query after another,
//! batch by batch: CSV and Parquet (one file per query, zipped when there are several,
//! with the same encoders as `/v1/sql`), and Excel (one sheet per query, rows
//! streamed to a temporary file so memory stays flat). PDF is in `pdf.rs`.

use std::fs::File;
use std::io::{BufWriter, Seek as _, Write as _};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray as _, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use rust_xlsxwriter::{Chart, ChartType, ExcelDateTime, Format as CellFormat, Workbook};
use serde_json::{Map, Value};
use zip::write::SimpleFileOptions;

use super::def::{Chart as ChartDef, ChartKind, Format};
use crate::sql::encode::{ResultEncoder, ResultFormat};

/// Excel's rows per sheet, the header included.
const EXCEL_MAX_ROWS: u64 = 1_048_576;

/// Points a chart plots at most.
pub(crate) const CHART_MAX_POINTS: usize = 10_000;

/// What the whole report is.
#[derive(Debug, Clone)]
pub(crate) struct ReportMeta {
    pub(crate) title: String,
    /// When the run started (ms since the epoch).
    pub(crate) run_at: i64,
    pub(crate) params: Map<String, Value>,
    pub(crate) queries: usize,
}

/// One query of the report, as its writer is told before its rows.
#[derive(Debug, Clone)]
pub(crate) struct Part {
    pub(crate) index: usize,
    pub(crate) title: String,
    pub(crate) chart: Option<ChartDef>,
}

/// Writes one report file, query by query.
pub(crate) trait ReportWriter: Send {
    /// A query's result starts.
    fn begin(&mut self, part: &Part, schema: SchemaRef) -> Result<(), String>;
    /// Some of its rows.
    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String>;
    /// Its rows are all there.
    fn end(&mut self) -> Result<(), String>;
    /// Bytes written so far (what the result limit is checked against).
    fn bytes(&self) -> u64;
    /// Closes the file; returns its size.
    fn finish(self: Box<Self>) -> Result<u64, String>;
}

/// The writer of `format` into `file`.
pub(crate) fn writer(
    format: Format,
    file: File,
    meta: ReportMeta,
) -> Result<Box<dyn ReportWriter>, String> {
    Ok(match format {
        Format::Csv => Box::new(Files::new(ResultFormat::Csv, file, meta.queries > 1)),
        Format::Parquet => Box::new(Files::new(ResultFormat::Parquet, file, meta.queries > 1)),
        Format::Xlsx => Box::new(Xlsx::new(file)?),
        Format::Pdf => Box::new(super::pdf::Pdf::new(file, meta)),
    })
}

/// A name fit for a file or a sheet: letters, digits, `_` and `-`.
pub(crate) fn slug(title: &str, max: usize) -> String {
    let s: String = title
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(max)
        .collect();
    if s.is_empty() { "query".into() } else { s }
}

fn io_error(e: impl std::fmt::Display) -> String {
    format!("writing the file: {e}")
}

enum Out {
    Plain(BufWriter<File>),
    Zip(Box<zip::ZipWriter<File>>),
}

impl Out {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Plain(w) => w.write_all(bytes),
            Self::Zip(z) => z.write_all(bytes),
        }
    }
}

/// CSV or Parquet: each query is a file; several are entries of one zip archive.
struct Files {
    format: ResultFormat,
    out: Out,
    encoder: Option<ResultEncoder>,
    written: u64,
}

impl Files {
    fn new(format: ResultFormat, file: File, zipped: bool) -> Self {
        let out = if zipped {
            Out::Zip(Box::new(zip::ZipWriter::new(file)))
        } else {
            Out::Plain(BufWriter::with_capacity(1 << 20, file))
        };
        Self {
            format,
            out,
            encoder: None,
            written: 0,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.written += bytes.len() as u64;
        self.out.write_all(bytes).map_err(io_error)
    }
}

impl ReportWriter for Files {
    fn begin(&mut self, part: &Part, schema: SchemaRef) -> Result<(), String> {
        let ext = if self.format == ResultFormat::Csv {
            "csv"
        } else {
            "parquet"
        };
        if let Out::Zip(z) = &mut self.out {
            // Parquet is compressed already (zstd); CSV is deflated.
            let method = if self.format == ResultFormat::Csv {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let name = format!("{:02}-{}.{ext}", part.index + 1, slug(&part.title, 60));
            z.start_file(
                name,
                SimpleFileOptions::default()
                    .compression_method(method)
                    .large_file(true),
            )
            .map_err(io_error)?;
        }
        let (encoder, head) = ResultEncoder::start(self.format, schema).map_err(io_error)?;
        self.encoder = Some(encoder);
        self.put(&head)
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String> {
        let encoder = self.encoder.as_mut().ok_or("a batch before its query")?;
        let bytes = encoder.batch(batch).map_err(io_error)?;
        self.put(&bytes)
    }

    fn end(&mut self) -> Result<(), String> {
        let mut encoder = self.encoder.take().ok_or("the end of no query")?;
        let tail = encoder.finish().map_err(io_error)?;
        self.put(&tail)
    }

    fn bytes(&self) -> u64 {
        self.written
    }

    fn finish(self: Box<Self>) -> Result<u64, String> {
        let mut file = match self.out {
            Out::Plain(w) => w.into_inner().map_err(io_error)?,
            Out::Zip(z) => z.finish().map_err(io_error)?,
        };
        file.flush().map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
        file.stream_position().map_err(io_error)
    }
}

/// How a column's values become cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CellKind {
    /// Integers and floats: numbers as they are.
    Number,
    /// Decimals: numbers shown with their places (two at most).
    Decimal(i8),
    Bool,
    Date,
    /// Timestamps, in UTC.
    DateTime,
    Text,
    /// Anything else, as its text.
    Other,
}

fn cell_kind(ty: &DataType) -> CellKind {
    match ty {
        DataType::Decimal32(_, s)
        | DataType::Decimal64(_, s)
        | DataType::Decimal128(_, s)
        | DataType::Decimal256(_, s) => CellKind::Decimal(*s),
        t if t.is_integer() || t.is_floating() => CellKind::Number,
        DataType::Boolean => CellKind::Bool,
        DataType::Date32 | DataType::Date64 => CellKind::Date,
        DataType::Timestamp(_, _) => CellKind::DateTime,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => CellKind::Text,
        DataType::Dictionary(_, v) => cell_kind(v),
        _ => CellKind::Other,
    }
}

/// A column of one batch, cast to what its cells are written from.
enum Column {
    Number(arrow::array::Float64Array),
    Bool(arrow::array::BooleanArray),
    Date(arrow::array::Date32Array),
    DateTime(arrow::array::TimestampMillisecondArray),
    Text(arrow::array::StringArray),
    Other(ArrayRef),
}

/// Milliseconds since the epoch as an Excel serial date.
fn excel_serial_ms(ms: i64) -> f64 {
    ms as f64 / 86_400_000.0 + 25_569.0
}

fn prepare(array: &ArrayRef, kind: CellKind) -> Result<Column, String> {
    let cast = |ty: &DataType| arrow::compute::cast(array, ty).map_err(io_error);
    Ok(match kind {
        CellKind::Number | CellKind::Decimal(_) => Column::Number(
            cast(&DataType::Float64)?
                .as_primitive::<Float64Type>()
                .clone(),
        ),
        CellKind::Bool => Column::Bool(cast(&DataType::Boolean)?.as_boolean().clone()),
        CellKind::Date => Column::Date(
            cast(&DataType::Date32)?
                .as_primitive::<Date32Type>()
                .clone(),
        ),
        CellKind::DateTime => {
            let utc = match array.data_type() {
                DataType::Timestamp(_, Some(_)) => {
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
                }
                _ => DataType::Timestamp(TimeUnit::Millisecond, None),
            };
            Column::DateTime(
                cast(&utc)?
                    .as_primitive::<TimestampMillisecondType>()
                    .clone(),
            )
        }
        CellKind::Text => Column::Text(cast(&DataType::Utf8)?.as_string::<i32>().clone()),
        CellKind::Other => Column::Other(Arc::clone(array)),
    })
}

/// Text of any value, as `/v1/sql` would show it.
pub(crate) fn display(array: &ArrayRef, row: usize) -> String {
    ArrayFormatter::try_new(array.as_ref(), &FormatOptions::default())
        .map(|f| f.value(row).to_string())
        .unwrap_or_default()
}

/// A point of a chart whose series are the values of a column.
#[derive(Debug, Clone)]
pub(crate) enum XValue {
    Number(f64),
    Text(String),
}

/// Long points (x, series, y) as a grid: the x values and the series names in order
/// of first appearance, and the sum of y per (x, series) cell.
pub(crate) type Grid = (
    Vec<XValue>,
    Vec<String>,
    std::collections::HashMap<(usize, usize), f64>,
);

pub(crate) fn pivot(points: &[(XValue, String, Option<f64>)]) -> Grid {
    let mut x_index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut s_index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut x_values = Vec::new();
    let mut series_names = Vec::new();
    let mut cells = std::collections::HashMap::new();
    for (x, s, y) in points {
        let key = match x {
            XValue::Number(v) => format!("n{v}"),
            XValue::Text(t) => format!("t{t}"),
        };
        let xi = *x_index.entry(key).or_insert_with(|| {
            x_values.push(x.clone());
            x_values.len() - 1
        });
        let si = *s_index.entry(s.as_str()).or_insert_with(|| {
            series_names.push(s.clone());
            series_names.len() - 1
        });
        if let Some(y) = y {
            *cells.entry((xi, si)).or_insert(0.0) += y;
        }
    }
    (x_values, series_names, cells)
}

/// The sheet being written.
struct Sheet {
    index: usize,
    name: String,
    kinds: Vec<CellKind>,
    names: Vec<String>,
    /// The next row to write (0 is the header).
    row: u32,
    widths: Vec<usize>,
    chart: Option<ChartDef>,
    /// With a series column: (x, series, y) of the first points.
    points: Vec<(XValue, String, Option<f64>)>,
}

/// Excel: one sheet per query, a bold frozen header, typed cells, column widths from
/// the first rows, an autofilter, and a native chart where the query has one.
struct Xlsx {
    workbook: Workbook,
    file: File,
    sheet: Option<Sheet>,
    used_names: Vec<String>,
    header: CellFormat,
    date: CellFormat,
    datetime: CellFormat,
    decimal0: CellFormat,
    decimal2: CellFormat,
    /// Cells written, times a rough size, for the result limit.
    written: u64,
    /// Hidden sheets of pivoted chart data, written last.
    grids: Vec<GridSheet>,
}

/// A hidden sheet with one column per series, which a chart with a series column plots.
struct GridSheet {
    name: String,
    x_title: String,
    x_format: Option<CellFormat>,
    grid: Grid,
}

impl Xlsx {
    fn new(file: File) -> Result<Self, String> {
        let mut workbook = Workbook::new();
        workbook
            .set_tempdir(std::env::temp_dir())
            .map_err(io_error)?;
        Ok(Self {
            workbook,
            file,
            sheet: None,
            used_names: Vec::new(),
            header: CellFormat::new()
                .set_bold()
                .set_border_bottom(rust_xlsxwriter::FormatBorder::Thin),
            date: CellFormat::new().set_num_format("yyyy-mm-dd"),
            datetime: CellFormat::new().set_num_format("yyyy-mm-dd hh:mm:ss"),
            decimal0: CellFormat::new().set_num_format("#,##0"),
            decimal2: CellFormat::new().set_num_format("#,##0.00"),
            written: 0,
            grids: Vec::new(),
        })
    }

    /// A sheet name Excel takes: at most 31 characters, none of `[]:*?/\`, unique.
    fn sheet_name(&mut self, title: &str) -> String {
        let clean: String = title
            .chars()
            .map(|c| if "[]:*?/\\".contains(c) { ' ' } else { c })
            .collect();
        let clean = clean.trim().trim_matches('\'');
        let base: String = if clean.is_empty() {
            "Sheet".into()
        } else {
            clean.chars().take(31).collect()
        };
        let mut name = base.clone();
        let mut n = 2;
        while self
            .used_names
            .iter()
            .any(|u| u.eq_ignore_ascii_case(&name))
        {
            let suffix = format!(" ({n})");
            name = base
                .chars()
                .take(31 - suffix.len())
                .chain(suffix.chars())
                .collect();
            n += 1;
        }
        self.used_names.push(name.clone());
        name
    }
}

impl Xlsx {
    fn grid_sheet(&mut self, g: GridSheet) -> Result<(), String> {
        let (x_values, series_names, cells) = g.grid;
        let header = self.header.clone();
        let ws = self.workbook.add_worksheet();
        ws.set_name(&g.name).map_err(io_error)?;
        ws.set_hidden(true);
        ws.write_string_with_format(0, 0, &g.x_title, &header)
            .map_err(io_error)?;
        for (si, s) in series_names.iter().enumerate() {
            ws.write_string_with_format(0, si as u16 + 1, s, &header)
                .map_err(io_error)?;
        }
        for (xi, x) in x_values.iter().enumerate() {
            let row = xi as u32 + 1;
            match (x, &g.x_format) {
                (XValue::Number(v), Some(f)) => {
                    ws.write_number_with_format(row, 0, *v, f)
                        .map_err(io_error)?;
                }
                (XValue::Number(v), None) => {
                    ws.write_number(row, 0, *v).map_err(io_error)?;
                }
                (XValue::Text(t), _) => {
                    ws.write_string(row, 0, t).map_err(io_error)?;
                }
            }
            for si in 0..series_names.len() {
                if let Some(v) = cells.get(&(xi, si)) {
                    ws.write_number(row, si as u16 + 1, *v).map_err(io_error)?;
                }
            }
        }
        Ok(())
    }
}

impl ReportWriter for Xlsx {
    fn begin(&mut self, part: &Part, schema: SchemaRef) -> Result<(), String> {
        let name = self.sheet_name(&part.title);
        let header = self.header.clone();
        let ws = self
            .workbook
            .add_worksheet_with_constant_memory()
            .map_err(io_error)?;
        ws.set_name(&name).map_err(io_error)?;
        let index = self.workbook.worksheets().len() - 1;
        let ws = self
            .workbook
            .worksheet_from_index(index)
            .map_err(io_error)?;
        let mut names = Vec::new();
        let mut kinds = Vec::new();
        let mut widths = Vec::new();
        for (c, field) in schema.fields().iter().enumerate() {
            ws.write_string_with_format(0, c as u16, field.name(), &header)
                .map_err(io_error)?;
            names.push(field.name().clone());
            kinds.push(cell_kind(field.data_type()));
            widths.push(field.name().chars().count() + 2);
        }
        ws.set_freeze_panes(1, 0).map_err(io_error)?;
        self.sheet = Some(Sheet {
            index,
            name,
            kinds,
            names,
            row: 1,
            widths,
            chart: part.chart.clone(),
            points: Vec::new(),
        });
        Ok(())
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String> {
        let sheet = self.sheet.as_mut().ok_or("a batch before its query")?;
        if u64::from(sheet.row) + batch.num_rows() as u64 > EXCEL_MAX_ROWS {
            return Err(format!(
                "the result has more than {} rows, the most an Excel sheet holds; add a LIMIT or aggregate",
                EXCEL_MAX_ROWS - 1
            ));
        }
        let columns: Vec<Column> = batch
            .columns()
            .iter()
            .zip(&sheet.kinds)
            .map(|(a, k)| prepare(a, *k))
            .collect::<Result<_, _>>()?;
        let measure = sheet.row < 200;
        let series_cols = sheet.chart.as_ref().and_then(|c| {
            let s = c.series.as_ref()?;
            let find = |n: &str| sheet.names.iter().position(|x| x == n);
            Some((find(&c.x)?, find(s)?, find(&c.y[0])?))
        });
        let ws = self
            .workbook
            .worksheet_from_index(sheet.index)
            .map_err(io_error)?;
        for r in 0..batch.num_rows() {
            let row = sheet.row;
            for (c, column) in columns.iter().enumerate() {
                let col = c as u16;
                let shown = match column {
                    Column::Number(a) if a.is_valid(r) => {
                        let v = a.value(r);
                        let written = match sheet.kinds[c] {
                            CellKind::Decimal(0) => {
                                ws.write_number_with_format(row, col, v, &self.decimal0)
                            }
                            CellKind::Decimal(_) => {
                                ws.write_number_with_format(row, col, v, &self.decimal2)
                            }
                            _ => ws.write_number(row, col, v),
                        };
                        written.map_err(io_error)?;
                        measure.then(|| format!("{v:.2}").len())
                    }
                    Column::Bool(a) if a.is_valid(r) => {
                        ws.write_boolean(row, col, a.value(r)).map_err(io_error)?;
                        Some(5)
                    }
                    Column::Date(a) if a.is_valid(r) => {
                        let serial = excel_serial_ms(i64::from(a.value(r)) * 86_400_000);
                        let dt = ExcelDateTime::from_serial_datetime(serial).map_err(io_error)?;
                        ws.write_datetime_with_format(row, col, &dt, &self.date)
                            .map_err(io_error)?;
                        Some(10)
                    }
                    Column::DateTime(a) if a.is_valid(r) => {
                        let dt = ExcelDateTime::from_serial_datetime(excel_serial_ms(a.value(r)))
                            .map_err(io_error)?;
                        ws.write_datetime_with_format(row, col, &dt, &self.datetime)
                            .map_err(io_error)?;
                        Some(19)
                    }
                    Column::Text(a) if a.is_valid(r) => {
                        let s = a.value(r);
                        // Excel holds at most 32,767 characters in a cell.
                        let s: std::borrow::Cow<'_, str> = if s.len() > 32_767 {
                            s.chars().take(32_767).collect::<String>().into()
                        } else {
                            s.into()
                        };
                        ws.write_string(row, col, s.as_ref()).map_err(io_error)?;
                        measure.then(|| s.chars().count())
                    }
                    Column::Other(a) if a.is_valid(r) => {
                        let s = display(a, r);
                        ws.write_string(row, col, &s).map_err(io_error)?;
                        measure.then(|| s.chars().count())
                    }
                    _ => None,
                };
                if let Some(w) = shown {
                    sheet.widths[c] = sheet.widths[c].max(w + 2);
                }
            }
            if let Some((xc, sc, yc)) = series_cols
                && sheet.points.len() < CHART_MAX_POINTS
            {
                let x = match &columns[xc] {
                    Column::Number(a) if a.is_valid(r) => XValue::Number(a.value(r)),
                    Column::Date(a) if a.is_valid(r) => {
                        XValue::Number(excel_serial_ms(i64::from(a.value(r)) * 86_400_000))
                    }
                    Column::DateTime(a) if a.is_valid(r) => {
                        XValue::Number(excel_serial_ms(a.value(r)))
                    }
                    _ => XValue::Text(display(batch.column(xc), r)),
                };
                let series = display(batch.column(sc), r);
                let y = match &columns[yc] {
                    Column::Number(a) if a.is_valid(r) => Some(a.value(r)),
                    _ => None,
                };
                sheet.points.push((x, series, y));
            }
            sheet.row += 1;
        }
        self.written += (batch.num_rows() * batch.num_columns()) as u64 * 12;
        Ok(())
    }

    fn end(&mut self) -> Result<(), String> {
        let sheet = self.sheet.take().ok_or("the end of no query")?;
        let last_row = sheet.row.saturating_sub(1);
        let last_col = sheet.names.len().saturating_sub(1) as u16;
        {
            let ws = self
                .workbook
                .worksheet_from_index(sheet.index)
                .map_err(io_error)?;
            for (c, w) in sheet.widths.iter().enumerate() {
                ws.set_column_width(c as u16, (*w).clamp(8, 60) as f64)
                    .map_err(io_error)?;
            }
            if !sheet.names.is_empty() {
                ws.autofilter(0, 0, last_row, last_col).map_err(io_error)?;
            }
        }
        // A chart of no rows is no chart (and Excel refuses one without a series).
        let Some(def) = sheet.chart.as_ref().filter(|_| sheet.row > 1) else {
            return Ok(());
        };
        let kind = match def.kind {
            ChartKind::Line => ChartType::Line,
            ChartKind::Bar => ChartType::Column,
        };
        let mut chart = Chart::new(kind);
        chart.title().set_name(&sheet.name);
        chart.x_axis().set_name(&def.x);
        let col = |n: &str| sheet.names.iter().position(|x| x == n).unwrap_or(0) as u16;
        let anchor_col = last_col + 2;
        if def.series.is_some() {
            // Long rows (x, series, y) become a hidden sheet with one column per series.
            let data_name = self.sheet_name(&format!("{} data", sheet.name));
            let (x_values, series_names, cells) = pivot(&sheet.points);
            if series_names.is_empty() {
                return Ok(());
            }
            let x_kind = sheet.kinds[usize::from(col(&def.x))];
            let x_format = match x_kind {
                CellKind::Date => Some(self.date.clone()),
                CellKind::DateTime => Some(self.datetime.clone()),
                _ => None,
            };
            let last = x_values.len().max(1) as u32;
            for (si, s) in series_names.iter().enumerate() {
                chart
                    .add_series()
                    .set_name(s.as_str())
                    .set_categories((data_name.as_str(), 1, 0, last, 0))
                    .set_values((data_name.as_str(), 1, si as u16 + 1, last, si as u16 + 1));
            }
            chart.y_axis().set_name(&def.y[0]);
            // Written in `finish`, after every query's own sheet.
            self.grids.push(GridSheet {
                name: data_name,
                x_title: def.x.clone(),
                x_format,
                grid: (x_values, series_names, cells),
            });
        } else {
            let last = last_row.clamp(1, CHART_MAX_POINTS as u32);
            let x = col(&def.x);
            for y in &def.y {
                let yc = col(y);
                chart
                    .add_series()
                    .set_name(y.as_str())
                    .set_categories((sheet.name.as_str(), 1, x, last, x))
                    .set_values((sheet.name.as_str(), 1, yc, last, yc));
            }
            if def.y.len() == 1 {
                chart.y_axis().set_name(&def.y[0]);
            }
        }
        let ws = self
            .workbook
            .worksheet_from_index(sheet.index)
            .map_err(io_error)?;
        ws.insert_chart(1, anchor_col, &chart).map_err(io_error)?;
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.written
    }

    fn finish(mut self: Box<Self>) -> Result<u64, String> {
        for grid in std::mem::take(&mut self.grids) {
            self.grid_sheet(grid)?;
        }
        let mut out = BufWriter::with_capacity(1 << 20, &self.file);
        self.workbook.save_to_writer(&mut out).map_err(io_error)?;
        out.flush().map_err(io_error)?;
        drop(out);
        self.file.sync_all().map_err(io_error)?;
        let len = self.file.metadata().map_err(io_error)?.len();
        Ok(len)
    }
}

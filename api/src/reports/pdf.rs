//! PDF reports: a title, the run time and parameters, then each query as a table
//! (paginated, its header repeated on every page) and its chart, drawn as vector paths
//! and real text. The font (DejaVu Sans, `api/assets/fonts`) is embedded and subset by
//! krilla, so the file looks the same everywhere and its text can be selected and
//! extracted.
//!
//! Pages are laid out as the rows arrive and kept as drawing operations; they become
//! PDF pages at the end, when the page count for the footers is known. A table shows
//! at most [`PDF_MAX_ROWS`] rows and says how many it left out: a PDF is for reading,
//! the other formats are for the full data.

use std::fs::File;
use std::io::Write as _;
use std::sync::LazyLock;

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::SchemaRef;
use krilla::Document;
use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point, Rect};
use krilla::metadata::{DateTime as PdfTime, Metadata};
use krilla::num::NormalizedF32;
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::text::{Font, TextDirection};
use serde_json::{Map, Value};

use super::def::{Chart as ChartDef, ChartKind};
use super::render::{CHART_MAX_POINTS, Part, ReportMeta, ReportWriter, XValue, display, pivot};

/// Rows a table shows at most.
pub(crate) const PDF_MAX_ROWS: u64 = 5_000;

static REGULAR: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static BOLD: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-Bold.ttf");

static FACE: LazyLock<Option<ttf_parser::Face<'static>>> =
    LazyLock::new(|| ttf_parser::Face::parse(REGULAR, 0).ok());

/// A4 landscape, in points.
const PAGE_W: f32 = 842.0;
const PAGE_H: f32 = 595.0;
const MARGIN: f32 = 36.0;
const TABLE_SIZE: f32 = 8.0;
const ROW_H: f32 = 13.0;
const CHART_H: f32 = 240.0;
/// How much wider the bold face sets text than the regular one, about.
const BOLD_SCALE: f32 = 1.12;

/// Series colours of charts.
const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
];

/// Width of `text` at `size` points in the regular font.
fn text_width(text: &str, size: f32) -> f32 {
    let Some(face) = FACE.as_ref() else {
        return text.chars().count() as f32 * size * 0.6;
    };
    let per_em = f32::from(face.units_per_em());
    let units: f32 = text
        .chars()
        .map(|c| {
            face.glyph_index(c)
                .and_then(|g| face.glyph_hor_advance(g))
                .map_or(per_em * 0.6, f32::from)
        })
        .sum();
    units / per_em * size
}

/// `text` cut to fit `width` with an ellipsis.
fn fit(text: &str, size: f32, width: f32) -> String {
    if text_width(text, size) <= width {
        return text.to_owned();
    }
    let mut out = String::new();
    for c in text.chars() {
        out.push(c);
        if text_width(&out, size) + text_width("…", size) > width {
            out.pop();
            break;
        }
    }
    out.push('…');
    out
}

/// One drawing operation of a page; y grows downwards from the top.
#[derive(Debug, Clone)]
enum Op {
    Text {
        x: f32,
        y: f32,
        size: f32,
        bold: bool,
        gray: u8,
        text: String,
    },
    Line {
        points: Vec<(f32, f32)>,
        width: f32,
        color: (u8, u8, u8),
    },
    Rect {
        x: f32,
        y: f32,
        w: f32,
        h: f32,
        color: (u8, u8, u8),
    },
}

/// The table being laid out.
struct Table {
    title: String,
    names: Vec<String>,
    numeric: Vec<bool>,
    /// Column widths, fixed at the first rows.
    widths: Option<Vec<f32>>,
    /// Rows kept until the widths are known.
    pending: Vec<Vec<String>>,
    shown: u64,
    total: u64,
    chart: Option<ChartDef>,
    points: Vec<(XValue, String, Option<f64>)>,
}

/// The PDF writer.
pub(crate) struct Pdf {
    file: File,
    meta: ReportMeta,
    pages: Vec<Vec<Op>>,
    /// Where the next line goes on the last page.
    y: f32,
    table: Option<Table>,
}

impl Pdf {
    pub(crate) fn new(file: File, meta: ReportMeta) -> Self {
        let mut pdf = Self {
            file,
            meta,
            pages: vec![Vec::new()],
            y: MARGIN,
            table: None,
        };
        pdf.head();
        pdf
    }

    fn op(&mut self, op: Op) {
        if let Some(page) = self.pages.last_mut() {
            page.push(op);
        }
    }

    fn text(&mut self, x: f32, size: f32, bold: bool, text: impl Into<String>) {
        let y = self.y;
        self.op(Op::Text {
            x,
            y,
            size,
            bold,
            gray: 0,
            text: text.into(),
        });
    }

    fn new_page(&mut self) {
        self.pages.push(Vec::new());
        self.y = MARGIN;
    }

    /// Starts a new page unless `height` more fits on this one.
    fn room(&mut self, height: f32) -> bool {
        if self.y + height > PAGE_H - MARGIN - 14.0 {
            self.new_page();
            return true;
        }
        false
    }

    /// The title, the run time and the parameters.
    fn head(&mut self) {
        self.y += 18.0;
        let title = self.meta.title.clone();
        self.text(MARGIN, 18.0, true, title);
        self.y += 18.0;
        let at = chrono::DateTime::from_timestamp_millis(self.meta.run_at)
            .unwrap_or_default()
            .format("%Y-%m-%d %H:%M:%S UTC");
        self.text(MARGIN, 10.0, false, format!("Run at {at}"));
        if !self.meta.params.is_empty() {
            self.y += 14.0;
            let params = params_text(&self.meta.params);
            let line = fit(
                &format!("Parameters: {params}"),
                10.0,
                PAGE_W - 2.0 * MARGIN,
            );
            self.text(MARGIN, 10.0, false, line);
        }
        self.y += 14.0;
    }

    fn header_row(&mut self, table_names: &[String], widths: &[f32], numeric: &[bool]) {
        let top = self.y;
        self.op(Op::Rect {
            x: MARGIN,
            y: top,
            w: widths.iter().sum(),
            h: ROW_H,
            color: (225, 230, 238),
        });
        self.y += ROW_H - 3.5;
        self.cells(table_names, widths, numeric, true);
        self.y += 3.5;
    }

    fn cells(&mut self, values: &[String], widths: &[f32], numeric: &[bool], bold: bool) {
        let mut x = MARGIN;
        for ((v, w), num) in values.iter().zip(widths).zip(numeric) {
            let scale = if bold { BOLD_SCALE } else { 1.0 };
            let shown = fit(v, TABLE_SIZE * scale, w - 6.0);
            let at = if *num {
                x + w - 3.0 - text_width(&shown, TABLE_SIZE * scale)
            } else {
                x + 3.0
            };
            let y = self.y;
            self.op(Op::Text {
                x: at,
                y,
                size: TABLE_SIZE,
                bold,
                gray: 0,
                text: shown,
            });
            x += w;
        }
    }

    /// Draws a row, with the header again at the top of a new page.
    fn row(&mut self, values: &[String]) {
        let Some(t) = self.table.as_ref() else { return };
        let (names, widths, numeric) = (
            t.names.clone(),
            t.widths.clone().unwrap_or_default(),
            t.numeric.clone(),
        );
        if self.room(ROW_H) {
            self.header_row(&names, &widths, &numeric);
        }
        self.y += ROW_H - 3.5;
        self.cells(values, &widths, &numeric, false);
        self.y += 3.5;
        let y = self.y;
        self.op(Op::Line {
            points: vec![(MARGIN, y), (MARGIN + widths.iter().sum::<f32>(), y)],
            width: 0.3,
            color: (210, 210, 210),
        });
    }

    /// Fixes the column widths from the header and the first rows, draws the header and
    /// the rows kept so far.
    fn lay_out(&mut self) {
        let Some(t) = self.table.as_mut() else { return };
        if t.widths.is_some() {
            return;
        }
        let avail = PAGE_W - 2.0 * MARGIN;
        let natural: Vec<f32> = (0..t.names.len())
            .map(|c| {
                let header = text_width(&t.names[c], TABLE_SIZE * BOLD_SCALE);
                let widest = t
                    .pending
                    .iter()
                    .map(|r| text_width(&r[c], TABLE_SIZE))
                    .fold(header, f32::max);
                (widest + 8.0).clamp(30.0, 260.0)
            })
            .collect();
        let sum: f32 = natural.iter().sum();
        let widths: Vec<f32> = if sum > avail {
            natural.iter().map(|w| w * avail / sum).collect()
        } else {
            natural
        };
        t.widths = Some(widths.clone());
        let (names, numeric) = (t.names.clone(), t.numeric.clone());
        let rows = std::mem::take(&mut t.pending);
        self.room(ROW_H * 2.0);
        self.header_row(&names, &widths, &numeric);
        for r in rows {
            self.row(&r);
        }
    }

    /// Draws a chart of the points kept, below the table.
    fn chart(&mut self, def: &ChartDef, points: &[(XValue, String, Option<f64>)]) {
        let (xs, series, cells) = pivot(points);
        if xs.is_empty() {
            return;
        }
        self.y += 10.0;
        self.room(CHART_H + 30.0);
        let left = MARGIN + 50.0;
        let right = PAGE_W - MARGIN - 140.0;
        let top = self.y + 10.0;
        let bottom = top + CHART_H - 30.0;
        let (mut lo, mut hi) = cells
            .values()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(*v), b.max(*v))
            });
        if def.kind == ChartKind::Bar || lo > 0.0 {
            lo = lo.min(0.0);
        }
        if hi <= lo {
            hi = lo + 1.0;
        }
        let ticks = nice_ticks(lo, hi);
        let (lo, hi) = (ticks[0], ticks[ticks.len() - 1]);
        let y_of = |v: f64| bottom - ((v - lo) / (hi - lo)) as f32 * (bottom - top);
        // Grid and y labels.
        for t in &ticks {
            let y = y_of(*t);
            self.op(Op::Line {
                points: vec![(left, y), (right, y)],
                width: 0.3,
                color: (220, 220, 220),
            });
            let label = tick_label(*t);
            self.op(Op::Text {
                x: left - 4.0 - text_width(&label, 7.0),
                y: y + 2.5,
                size: 7.0,
                bold: false,
                gray: 80,
                text: label,
            });
        }
        self.op(Op::Line {
            points: vec![(left, top), (left, bottom), (right, bottom)],
            width: 0.8,
            color: (60, 60, 60),
        });
        // X labels, at most about ten.
        let n = xs.len();
        let slot = (right - left) / n as f32;
        let x_of = |i: usize| left + slot * (i as f32 + 0.5);
        let every = n.div_ceil(10).max(1);
        for (i, x) in xs.iter().enumerate().step_by(every) {
            let label = match x {
                XValue::Text(t) => t.clone(),
                XValue::Number(v) => tick_label(*v),
            };
            let label = fit(&label, 7.0, slot * every as f32 - 2.0);
            self.op(Op::Text {
                x: x_of(i) - text_width(&label, 7.0) / 2.0,
                y: bottom + 10.0,
                size: 7.0,
                bold: false,
                gray: 80,
                text: label,
            });
        }
        let x_title = def.x.clone();
        self.op(Op::Text {
            x: (left + right) / 2.0 - text_width(&x_title, 8.0) / 2.0,
            y: bottom + 22.0,
            size: 8.0,
            bold: true,
            gray: 40,
            text: x_title,
        });
        // Series.
        let bar_w = slot * 0.8 / series.len().max(1) as f32;
        for (si, name) in series.iter().enumerate() {
            let color = PALETTE[si % PALETTE.len()];
            match def.kind {
                ChartKind::Line => {
                    let points: Vec<(f32, f32)> = (0..n)
                        .filter_map(|xi| cells.get(&(xi, si)).map(|v| (x_of(xi), y_of(*v))))
                        .collect();
                    if points.len() == 1 {
                        let (x, y) = points[0];
                        self.op(Op::Rect {
                            x: x - 1.5,
                            y: y - 1.5,
                            w: 3.0,
                            h: 3.0,
                            color,
                        });
                    } else if points.len() > 1 {
                        self.op(Op::Line {
                            points,
                            width: 1.4,
                            color,
                        });
                    }
                }
                ChartKind::Bar => {
                    for xi in 0..n {
                        if let Some(v) = cells.get(&(xi, si)) {
                            let x0 = x_of(xi) - slot * 0.4 + bar_w * si as f32;
                            let (ya, yb) = (y_of(*v), y_of(0.0_f64.max(lo)));
                            self.op(Op::Rect {
                                x: x0,
                                y: ya.min(yb),
                                w: bar_w.max(0.5),
                                h: (ya - yb).abs().max(0.3),
                                color,
                            });
                        }
                    }
                }
            }
            // Legend.
            let ly = top + 4.0 + si as f32 * 12.0;
            if si < 20 {
                self.op(Op::Rect {
                    x: right + 12.0,
                    y: ly - 6.0,
                    w: 8.0,
                    h: 8.0,
                    color,
                });
                let label = fit(name, 8.0, 110.0);
                self.op(Op::Text {
                    x: right + 24.0,
                    y: ly + 1.5,
                    size: 8.0,
                    bold: false,
                    gray: 0,
                    text: label,
                });
            }
        }
        self.y = bottom + 34.0;
    }
}

fn params_text(params: &Map<String, Value>) -> String {
    params
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k} = {s}"),
            other => format!("{k} = {other}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// About five round steps from `lo` to `hi`, covering both.
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let mut ticks = Vec::new();
    let mut t = start;
    while t < hi + step * 0.5 && ticks.len() < 20 {
        ticks.push(t);
        t += step;
    }
    if ticks.len() < 2 {
        ticks.push(start + step);
    }
    ticks
}

fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl ReportWriter for Pdf {
    fn begin(&mut self, part: &Part, schema: SchemaRef) -> Result<(), String> {
        self.y += 10.0;
        self.room(ROW_H * 4.0);
        self.y += 14.0;
        let title = part.title.clone();
        self.text(MARGIN, 13.0, true, title.clone());
        self.y += 8.0;
        self.table = Some(Table {
            title,
            names: schema.fields().iter().map(|f| f.name().clone()).collect(),
            numeric: schema
                .fields()
                .iter()
                .map(|f| f.data_type().is_numeric())
                .collect(),
            widths: None,
            pending: Vec::new(),
            shown: 0,
            total: 0,
            chart: part.chart.clone(),
            points: Vec::new(),
        });
        Ok(())
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<(), String> {
        let Some(t) = self.table.as_mut() else {
            return Err("a batch before its query".into());
        };
        t.total += batch.num_rows() as u64;
        let columns: Vec<ArrayRef> = batch.columns().to_vec();
        let find = |n: &str| t.names.iter().position(|x| x == n);
        let chart_cols = t.chart.as_ref().map(|c| {
            let ys: Vec<(String, Option<usize>)> =
                c.y.iter().map(|y| (y.clone(), find(y))).collect();
            (find(&c.x), c.series.as_deref().and_then(find), ys)
        });
        let mut rows = Vec::new();
        for r in 0..batch.num_rows() {
            if let Some((Some(xc), series, ys)) = &chart_cols
                && t.points.len() < CHART_MAX_POINTS
            {
                let x_text = display(&columns[*xc], r);
                let x = if columns[*xc].data_type().is_numeric() {
                    x_text
                        .parse::<f64>()
                        .map_or(XValue::Text(x_text.clone()), XValue::Number)
                } else {
                    XValue::Text(x_text)
                };
                for (name, yc) in ys {
                    let y = yc.and_then(|c| {
                        columns[c]
                            .is_valid(r)
                            .then(|| display(&columns[c], r).parse::<f64>().ok())
                            .flatten()
                    });
                    let s = match series {
                        Some(sc) => display(&columns[*sc], r),
                        None => name.clone(),
                    };
                    t.points.push((x.clone(), s, y));
                }
            }
            if t.shown < PDF_MAX_ROWS {
                t.shown += 1;
                rows.push(
                    columns
                        .iter()
                        .map(|a| {
                            if a.is_valid(r) {
                                display(a, r)
                            } else {
                                String::new()
                            }
                        })
                        .collect::<Vec<_>>(),
                );
            }
        }
        if t.widths.is_none() {
            t.pending.extend(rows);
            if t.pending.len() >= 50 {
                self.lay_out();
            }
        } else {
            for r in rows {
                self.row(&r);
            }
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), String> {
        self.lay_out();
        let Some(t) = self.table.take() else {
            return Err("the end of no query".into());
        };
        self.y += 12.0;
        self.room(14.0);
        let note = if t.total > t.shown {
            format!(
                "{}: the first {} of {} rows are shown; the CSV, Parquet and Excel formats hold them all.",
                t.title, t.shown, t.total
            )
        } else {
            format!("{} rows", t.total)
        };
        self.op(Op::Text {
            x: MARGIN,
            y: self.y,
            size: 8.0,
            bold: false,
            gray: 90,
            text: note,
        });
        if let Some(def) = &t.chart {
            self.chart(def, &t.points);
        }
        Ok(())
    }

    fn bytes(&self) -> u64 {
        // Operations are small and the rows shown are capped.
        self.pages.iter().map(|p| p.len() as u64 * 40).sum()
    }

    fn finish(mut self: Box<Self>) -> Result<u64, String> {
        let regular = Font::new(REGULAR.into(), 0).ok_or("the embedded font does not load")?;
        let bold = Font::new(BOLD.into(), 0).ok_or("the embedded bold font does not load")?;
        let mut document = Document::new();
        let mut metadata = Metadata::new()
            .title(self.meta.title.clone())
            .creator("Quiver".into());
        if let Some(t) = chrono::DateTime::from_timestamp_millis(self.meta.run_at) {
            use chrono::{Datelike as _, Timelike as _};
            metadata = metadata.creation_date(
                PdfTime::new(t.year() as u16)
                    .month(t.month() as u8)
                    .day(t.day() as u8)
                    .hour(t.hour() as u8)
                    .minute(t.minute() as u8)
                    .second(t.second() as u8),
            );
        }
        document.set_metadata(metadata);
        let total = self.pages.len();
        let settings = PageSettings::from_wh(PAGE_W, PAGE_H).ok_or("bad page size")?;
        for (n, ops) in std::mem::take(&mut self.pages).into_iter().enumerate() {
            let mut page = document.start_page_with(settings.clone());
            let mut surface = page.surface();
            for op in ops {
                draw(&mut surface, &regular, &bold, op);
            }
            let footer = format!("{} · page {} of {total}", self.meta.title, n + 1);
            draw(
                &mut surface,
                &regular,
                &bold,
                Op::Text {
                    x: MARGIN,
                    y: PAGE_H - MARGIN + 12.0,
                    size: 7.0,
                    bold: false,
                    gray: 110,
                    text: footer,
                },
            );
            surface.finish();
            page.finish();
        }
        let bytes = document
            .finish()
            .map_err(|e| format!("writing the PDF: {e:?}"))?;
        self.file
            .write_all(&bytes)
            .map_err(|e| format!("writing the file: {e}"))?;
        self.file
            .sync_all()
            .map_err(|e| format!("writing the file: {e}"))?;
        Ok(bytes.len() as u64)
    }
}

fn fill(color: (u8, u8, u8)) -> Fill {
    Fill {
        paint: rgb::Color::new(color.0, color.1, color.2).into(),
        opacity: NormalizedF32::ONE,
        rule: Default::default(),
    }
}

fn draw(surface: &mut krilla::surface::Surface<'_>, regular: &Font, bold: &Font, op: Op) {
    match op {
        Op::Text {
            x,
            y,
            size,
            bold: b,
            gray,
            text,
        } => {
            surface.set_stroke(None);
            surface.set_fill(Some(fill((gray, gray, gray))));
            let font = if b { bold.clone() } else { regular.clone() };
            surface.draw_text(
                Point::from_xy(x, y),
                font,
                size,
                &text,
                false,
                TextDirection::Auto,
            );
        }
        Op::Line {
            points,
            width,
            color,
        } => {
            let mut pb = PathBuilder::new();
            for (i, (x, y)) in points.iter().enumerate() {
                if i == 0 {
                    pb.move_to(*x, *y);
                } else {
                    pb.line_to(*x, *y);
                }
            }
            if let Some(path) = pb.finish() {
                surface.set_fill(None);
                surface.set_stroke(Some(Stroke {
                    paint: rgb::Color::new(color.0, color.1, color.2).into(),
                    width,
                    ..Default::default()
                }));
                surface.draw_path(&path);
            }
        }
        Op::Rect { x, y, w, h, color } => {
            let mut pb = PathBuilder::new();
            if let Some(rect) = Rect::from_xywh(x, y, w, h) {
                pb.push_rect(rect);
            }
            if let Some(path) = pb.finish() {
                surface.set_stroke(None);
                surface.set_fill(Some(fill(color)));
                surface.draw_path(&path);
            }
        }
    }
}

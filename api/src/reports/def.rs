//! What a report is: its queries, format, schedule, recipients and parameters, as
//! `POST /v1/reports` takes them, and the checks that need no engine.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::schedule::Schedule;

/// Most queries in one report.
pub(crate) const MAX_QUERIES: usize = 20;

/// A report as its author wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportDef {
    /// Lowercase identifier; names the files and the URL.
    pub(crate) name: String,
    /// Heading of the document and subject of the email (default: the name).
    #[serde(default)]
    pub(crate) title: Option<String>,
    pub(crate) queries: Vec<ReportQuery>,
    pub(crate) format: Format,
    /// `[CRON_TZ=zone] <cron>`, or none to run only when asked.
    #[serde(default)]
    pub(crate) schedule: Option<String>,
    /// Recipients of each run's file.
    #[serde(default)]
    pub(crate) email: Vec<String>,
    /// Values for the queries' named placeholders (`$warehouse`).
    #[serde(default)]
    pub(crate) params: Map<String, Value>,
}

/// One query of a report: a table, a sheet or a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReportQuery {
    #[serde(default)]
    pub(crate) title: Option<String>,
    pub(crate) sql: String,
    #[serde(default)]
    pub(crate) chart: Option<Chart>,
}

/// A chart of one query's result: `x` along the bottom, one line or bar per `y`
/// column, or, with `series`, one per value of that column (then `y` has one column).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Chart {
    #[serde(rename = "type")]
    pub(crate) kind: ChartKind,
    pub(crate) x: String,
    pub(crate) y: Vec<String>,
    #[serde(default)]
    pub(crate) series: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ChartKind {
    Line,
    Bar,
}

/// The file a run produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, strum::EnumString)]
#[serde(rename_all = "lowercase", try_from = "String")]
#[strum(serialize_all = "lowercase")]
pub(crate) enum Format {
    Csv,
    Xlsx,
    Pdf,
    Parquet,
}

impl TryFrom<String> for Format {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
            .map_err(|_| format!("unknown format '{s}'; use csv, xlsx, pdf or parquet"))
    }
}

impl Format {
    /// The file name extension of one query's output in this format.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Xlsx => "xlsx",
            Self::Pdf => "pdf",
            Self::Parquet => "parquet",
        }
    }

    /// The content type of one query's output in this format.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            Self::Pdf => "application/pdf",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }

    /// Whether each query is a file of its own (zipped when there are several).
    pub(crate) fn file_per_query(self) -> bool {
        matches!(self, Self::Csv | Self::Parquet)
    }
}

impl ReportDef {
    /// The title, or the name when there is none.
    pub(crate) fn title(&self) -> &str {
        self.title.as_deref().unwrap_or(&self.name)
    }

    /// The title of query `i` (0-based), or "Query n".
    pub(crate) fn query_title(&self, i: usize) -> String {
        self.queries[i]
            .title
            .clone()
            .unwrap_or_else(|| format!("Query {}", i + 1))
    }

    /// The stored file's extension: the format's, or `zip` for several files.
    pub(crate) fn file_extension(&self) -> &'static str {
        if self.format.file_per_query() && self.queries.len() > 1 {
            "zip"
        } else {
            self.format.extension()
        }
    }

    /// The stored file's content type.
    pub(crate) fn content_type(&self) -> &'static str {
        content_type_of(self.file_extension())
    }

    /// The parsed schedule, if it has one.
    pub(crate) fn parsed_schedule(&self) -> Result<Option<Schedule>, String> {
        match self.schedule.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => Schedule::parse(text)
                .map(Some)
                .map_err(|e| format!("schedule: {e}")),
        }
    }

    /// Everything that can be checked without running the SQL.
    pub(crate) fn check(&self) -> Result<(), String> {
        check_name(&self.name)?;
        if self.title().chars().count() > 200 {
            return Err("title: at most 200 characters".into());
        }
        if self.queries.is_empty() {
            return Err("queries: a report needs at least one query".into());
        }
        if self.queries.len() > MAX_QUERIES {
            return Err(format!("queries: at most {MAX_QUERIES} in one report"));
        }
        for (i, q) in self.queries.iter().enumerate() {
            let at = format!("queries[{i}]");
            if q.sql.trim().is_empty() {
                return Err(format!("{at}.sql: empty"));
            }
            if q.title.as_deref().is_some_and(|t| t.chars().count() > 100) {
                return Err(format!("{at}.title: at most 100 characters"));
            }
            if let Some(chart) = &q.chart {
                if chart.x.is_empty() {
                    return Err(format!("{at}.chart.x: name the column along the bottom"));
                }
                if chart.y.is_empty() {
                    return Err(format!("{at}.chart.y: name at least one column to plot"));
                }
                if chart.series.is_some() && chart.y.len() != 1 {
                    return Err(format!(
                        "{at}.chart: with a series column, y names exactly one column"
                    ));
                }
            }
        }
        self.parsed_schedule()?;
        for (i, address) in self.email.iter().enumerate() {
            quiver_engine::mail::check_address(address).map_err(|e| format!("email[{i}]: {e}"))?;
        }
        for (key, value) in &self.params {
            check_param_name(key)?;
            if matches!(value, Value::Array(_) | Value::Object(_)) {
                return Err(format!(
                    "params.{key}: only null, booleans, numbers and strings can be bound"
                ));
            }
        }
        Ok(())
    }
}

/// The content type of a stored report file with extension `ext`.
pub(crate) fn content_type_of(ext: &str) -> &'static str {
    match ext {
        "zip" => "application/zip",
        other => other
            .parse::<Format>()
            .map_or("application/octet-stream", Format::content_type),
    }
}

/// A report name: lowercase letters, digits and `_`, starting with a letter or `_`.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name: '{name}' must be 1-63 lowercase letters, digits or '_', not starting with a digit"
        ))
    }
}

fn check_param_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "params: '{name}' is not a parameter name (letters, digits and '_', used as ${name})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(v: Value) -> Result<ReportDef, String> {
        let d: ReportDef = serde_json::from_value(v).map_err(|e| e.to_string())?;
        d.check()?;
        Ok(d)
    }

    fn base() -> Value {
        json!({"name": "daily", "queries": [{"sql": "SELECT 1"}], "format": "csv"})
    }

    fn with(key: &str, value: Value) -> Value {
        let mut v = base();
        v[key] = value;
        v
    }

    #[test]
    fn a_plain_definition_is_accepted_with_defaults() {
        let d = def(base()).unwrap();
        assert_eq!(d.title(), "daily");
        assert_eq!(d.query_title(0), "Query 1");
        assert_eq!(d.file_extension(), "csv");
        assert!(d.parsed_schedule().unwrap().is_none());
    }

    #[test]
    fn several_csv_or_parquet_files_are_one_zip_but_sheets_and_pages_are_not() {
        let two = json!([{"sql": "SELECT 1"}, {"sql": "SELECT 2"}]);
        let mut v = with("queries", two);
        for (format, ext) in [
            ("csv", "zip"),
            ("parquet", "zip"),
            ("xlsx", "xlsx"),
            ("pdf", "pdf"),
        ] {
            v["format"] = json!(format);
            let d = def(v.clone()).unwrap();
            assert_eq!(d.file_extension(), ext, "{format}");
        }
    }

    #[test]
    fn bad_definitions_say_which_field_is_wrong() {
        let cases = [
            (with("format", json!("docx")), "unknown format 'docx'"),
            (with("name", json!("Daily Sales")), "name: 'Daily Sales'"),
            (with("queries", json!([])), "at least one query"),
            (
                with("schedule", json!("every day")),
                "schedule: 'every day'",
            ),
            (with("email", json!(["not an address"])), "email[0]:"),
            (
                with("params", json!({"w": ["a", "b"]})),
                "params.w: only null",
            ),
            (
                with(
                    "queries",
                    json!([{"sql": "SELECT 1", "chart": {"type": "pie", "x": "a", "y": ["b"]}}]),
                ),
                "unknown variant `pie`",
            ),
            (
                with(
                    "queries",
                    json!([{"sql": "SELECT 1", "chart": {"type": "line", "x": "a", "y": []}}]),
                ),
                "queries[0].chart.y",
            ),
            (
                with(
                    "queries",
                    json!([{"sql": "SELECT 1", "chart": {"type": "bar", "x": "a", "y": ["b", "c"], "series": "d"}}]),
                ),
                "exactly one column",
            ),
            (with("colour", json!("red")), "unknown field `colour`"),
        ];
        for (v, want) in cases {
            let e = def(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}

//! Parsing one value of a column type from text, and the per-value rules.

use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use chrono::DateTime;
use quiver_engine::schema::{MONEY_PRECISION, MONEY_SCALE};
use quiver_engine::{ColumnType, Rule};
use std::sync::Arc;

/// A parsed, typed value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    Str(&'a str),
    Int(i64),
    Float(f64),
    Bool(bool),
    Micros(i64),
    Cents(i128),
}

/// How a JSON value was written, for type errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lexical {
    /// A JSON string, or any CSV field.
    Text,
    /// A JSON number.
    Number,
    /// `true` / `false`.
    Bool,
    /// Object or array.
    Nested,
}

impl Lexical {
    fn name(self) -> &'static str {
        match self {
            Self::Text => "a string",
            Self::Number => "a number",
            Self::Bool => "a boolean",
            Self::Nested => "an object or array",
        }
    }
}

/// Why one value was refused; the caller adds the row and the column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ValueError {
    #[error("expected {expected}, got {got}")]
    WrongKind {
        expected: &'static str,
        got: &'static str,
    },
    #[error("'{0}' is not a whole number in the 64-bit range")]
    NotWhole(String),
    #[error("'{0}' is not a finite number")]
    NotFinite(String),
    #[error("'{0}' is not a boolean")]
    NotBoolean(String),
    #[error("'{0}' is out of range for epoch milliseconds")]
    EpochOutOfRange(String),
    #[error("'{0}' is not a timestamp: use an RFC 3339 string or whole epoch milliseconds")]
    NumberNotTimestamp(String),
    #[error("'{text}' is not an RFC 3339 timestamp ({reason}); e.g. 2026-11-25T14:03:00Z")]
    NotRfc3339 { text: String, reason: String },
    #[error("'{0}' is not a decimal with at most 2 places")]
    NotDecimal(String),
    #[error("'{0}' has more than {MONEY_SCALE} decimal places")]
    TooManyPlaces(String),
    #[error("'{0}' does not fit decimal(18,2)")]
    TooWide(String),
}

/// Parses `text` as a value of `ty`. `lex` says how it was written; `strict` (JSON)
/// refuses numbers written as strings except for timestamps and money.
pub(crate) fn parse<'a>(
    ty: ColumnType,
    text: &'a str,
    lex: Lexical,
    strict: bool,
) -> Result<Scalar<'a>, ValueError> {
    let wrong = || ValueError::WrongKind {
        expected: ty.name(),
        got: lex.name(),
    };
    if lex == Lexical::Nested {
        return Err(wrong());
    }
    match ty {
        ColumnType::Utf8 => match lex {
            Lexical::Text => Ok(Scalar::Str(text)),
            _ if !strict => Ok(Scalar::Str(text)),
            _ => Err(wrong()),
        },
        ColumnType::Int64 => {
            if strict && lex != Lexical::Number {
                return Err(wrong());
            }
            text.trim()
                .parse::<i64>()
                .map(Scalar::Int)
                .map_err(|_| ValueError::NotWhole(clip(text)))
        }
        ColumnType::Float64 => {
            if strict && lex != Lexical::Number {
                return Err(wrong());
            }
            match text.trim().parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Scalar::Float(v)),
                _ => Err(ValueError::NotFinite(clip(text))),
            }
        }
        ColumnType::Boolean => match (lex, text.trim()) {
            (Lexical::Bool, "true") => Ok(Scalar::Bool(true)),
            (Lexical::Bool, "false") => Ok(Scalar::Bool(false)),
            (Lexical::Text, t) if !strict => match t.to_ascii_lowercase().as_str() {
                "true" | "t" | "1" | "yes" => Ok(Scalar::Bool(true)),
                "false" | "f" | "0" | "no" => Ok(Scalar::Bool(false)),
                _ => Err(ValueError::NotBoolean(clip(text))),
            },
            _ => Err(wrong()),
        },
        ColumnType::Timestamp => parse_timestamp(text.trim(), lex).map(Scalar::Micros),
        ColumnType::Money => {
            if lex == Lexical::Bool {
                return Err(wrong());
            }
            parse_money(text.trim()).map(Scalar::Cents)
        }
    }
}

fn clip(s: &str) -> String {
    if s.len() <= 40 {
        s.to_owned()
    } else {
        let mut end = 40;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// RFC 3339 text, or an integer count of milliseconds since the epoch.
fn parse_timestamp(text: &str, lex: Lexical) -> Result<i64, ValueError> {
    let looks_numeric = !text.is_empty()
        && text
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'));
    if looks_numeric {
        return text
            .parse::<i64>()
            .ok()
            .and_then(|ms| ms.checked_mul(1000))
            .filter(|us| DateTime::from_timestamp_micros(*us).is_some())
            .ok_or_else(|| ValueError::EpochOutOfRange(clip(text)));
    }
    if lex == Lexical::Number {
        return Err(ValueError::NumberNotTimestamp(clip(text)));
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|e| ValueError::NotRfc3339 {
            text: clip(text),
            reason: e.to_string(),
        })
}

/// Exact decimal text with at most two fractional digits, within 18 digits.
///
/// Hand-written rather than arrow's `parse_decimal`: that one rounds away digits past
/// the scale, and money with a third decimal place must be refused, not rounded.
pub(crate) fn parse_money(text: &str) -> Result<i128, ValueError> {
    let bad = || ValueError::NotDecimal(clip(text));
    let (neg, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let frac_trimmed = frac.trim_end_matches('0');
    if frac_trimmed.len() > MONEY_SCALE as usize {
        return Err(ValueError::TooManyPlaces(clip(text)));
    }
    let int_trimmed = int.trim_start_matches('0');
    if int_trimmed.len() > (MONEY_PRECISION as usize - MONEY_SCALE as usize) {
        return Err(ValueError::TooWide(clip(text)));
    }
    let mut cents: i128 = 0;
    for b in int_trimmed.bytes() {
        cents = cents * 10 + i128::from(b - b'0');
    }
    let mut f = frac_trimmed.bytes();
    for _ in 0..MONEY_SCALE {
        cents = cents * 10 + f.next().map(|b| i128::from(b - b'0')).unwrap_or(0);
    }
    Ok(if neg { -cents } else { cents })
}

/// Checks a value against a column rule; the reason if it fails.
pub(crate) fn check_rule(rule: &Rule, v: Scalar<'_>) -> Option<String> {
    match (rule, v) {
        (Rule::None, _) => None,
        (Rule::NonEmpty, Scalar::Str("")) => Some("must not be empty".into()),
        (Rule::Positive, Scalar::Int(n)) if n <= 0 => Some(format!("must be > 0, got {n}")),
        (Rule::Positive, Scalar::Float(n)) if n <= 0.0 => Some(format!("must be > 0, got {n}")),
        (Rule::Positive, Scalar::Cents(n)) if n <= 0 => {
            Some(format!("must be > 0, got {}", cents_text(n)))
        }
        (Rule::NonNegative, Scalar::Int(n)) if n < 0 => Some(format!("must be >= 0, got {n}")),
        (Rule::NonNegative, Scalar::Float(n)) if n < 0.0 => Some(format!("must be >= 0, got {n}")),
        (Rule::NonNegative, Scalar::Cents(n)) if n < 0 => {
            Some(format!("must be >= 0, got {}", cents_text(n)))
        }
        (Rule::NonZero, Scalar::Int(0)) => Some("must not be zero".into()),
        (Rule::NonZero, Scalar::Cents(0)) => Some("must not be zero".into()),
        (Rule::NonZero, Scalar::Float(0.0)) => Some("must not be zero".into()),
        (Rule::OneOf(allowed), Scalar::Str(s)) if !allowed.contains(&s) => Some(format!(
            "'{}' is not one of {}",
            clip(s),
            allowed.join(", ")
        )),
        _ => None,
    }
}

fn cents_text(c: i128) -> String {
    let sign = if c < 0 { "-" } else { "" };
    let c = c.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

/// An Arrow builder for one column type.
#[derive(Debug)]
pub(crate) enum ColumnBuilder {
    Utf8(StringBuilder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    Money(Decimal128Builder),
}

impl ColumnBuilder {
    pub(crate) fn new(ty: ColumnType, capacity: usize) -> Self {
        match ty {
            ColumnType::Utf8 => Self::Utf8(StringBuilder::with_capacity(capacity, capacity * 12)),
            ColumnType::Int64 => Self::Int64(Int64Builder::with_capacity(capacity)),
            ColumnType::Float64 => Self::Float64(Float64Builder::with_capacity(capacity)),
            ColumnType::Boolean => Self::Boolean(BooleanBuilder::with_capacity(capacity)),
            ColumnType::Timestamp => Self::Timestamp(
                TimestampMicrosecondBuilder::with_capacity(capacity).with_timezone("UTC"),
            ),
            ColumnType::Money => Self::Money(
                Decimal128Builder::with_capacity(capacity)
                    .with_precision_and_scale(MONEY_PRECISION, MONEY_SCALE)
                    .unwrap_or_else(|_| Decimal128Builder::with_capacity(capacity)),
            ),
        }
    }

    /// Appends a value (which must be of the builder's type) or a null.
    pub(crate) fn push(&mut self, v: Option<Scalar<'_>>) {
        match (self, v) {
            (Self::Utf8(b), Some(Scalar::Str(s))) => b.append_value(s),
            (Self::Int64(b), Some(Scalar::Int(n))) => b.append_value(n),
            (Self::Float64(b), Some(Scalar::Float(n))) => b.append_value(n),
            (Self::Boolean(b), Some(Scalar::Bool(n))) => b.append_value(n),
            (Self::Timestamp(b), Some(Scalar::Micros(n))) => b.append_value(n),
            (Self::Money(b), Some(Scalar::Cents(n))) => b.append_value(n),
            (Self::Utf8(b), _) => b.append_null(),
            (Self::Int64(b), _) => b.append_null(),
            (Self::Float64(b), _) => b.append_null(),
            (Self::Boolean(b), _) => b.append_null(),
            (Self::Timestamp(b), _) => b.append_null(),
            (Self::Money(b), _) => b.append_null(),
        }
    }

    pub(crate) fn finish(self) -> ArrayRef {
        match self {
            Self::Utf8(mut b) => Arc::new(b.finish()),
            Self::Int64(mut b) => Arc::new(b.finish()),
            Self::Float64(mut b) => Arc::new(b.finish()),
            Self::Boolean(mut b) => Arc::new(b.finish()),
            Self::Timestamp(mut b) => Arc::new(b.finish()),
            Self::Money(mut b) => Arc::new(b.finish()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_exact() {
        assert_eq!(parse_money("19.99"), Ok(1999));
        assert_eq!(parse_money("0.1"), Ok(10));
        assert_eq!(parse_money("5"), Ok(500));
        assert_eq!(parse_money("-3.50"), Ok(-350));
        assert_eq!(parse_money("1.250"), Ok(125));
        assert!(parse_money("1.234").is_err());
        assert!(parse_money("abc").is_err());
        assert!(parse_money("1e3").is_err());
        assert!(parse_money("").is_err());
        assert!(parse_money("1234567890123456789").is_err());
        assert_eq!(
            parse_money("9999999999999999.99"),
            Ok(999_999_999_999_999_999)
        );
    }

    #[test]
    fn timestamps_in_both_forms() {
        let a = parse(
            ColumnType::Timestamp,
            "2026-01-02T03:04:05.123456Z",
            Lexical::Text,
            true,
        );
        assert_eq!(a, Ok(Scalar::Micros(1_767_323_045_123_456)));
        let b = parse(
            ColumnType::Timestamp,
            "1767323045123",
            Lexical::Number,
            true,
        );
        assert_eq!(b, Ok(Scalar::Micros(1_767_323_045_123_000)));
        let c = parse(
            ColumnType::Timestamp,
            "2026-01-02T04:04:05.123456+01:00",
            Lexical::Text,
            true,
        );
        assert_eq!(c, a);
        assert!(parse(ColumnType::Timestamp, "yesterday", Lexical::Text, true).is_err());
        assert!(parse(ColumnType::Timestamp, "1.5", Lexical::Number, true).is_err());
        assert!(
            parse(
                ColumnType::Timestamp,
                "99999999999999999",
                Lexical::Number,
                true
            )
            .is_err()
        );
    }

    #[test]
    fn strict_json_types() {
        assert!(parse(ColumnType::Int64, "5", Lexical::Text, true).is_err());
        assert_eq!(
            parse(ColumnType::Int64, "5", Lexical::Text, false),
            Ok(Scalar::Int(5))
        );
        assert!(parse(ColumnType::Int64, "5.5", Lexical::Number, true).is_err());
        assert!(parse(ColumnType::Utf8, "5", Lexical::Number, true).is_err());
        assert!(parse(ColumnType::Utf8, "{}", Lexical::Nested, false).is_err());
    }

    #[test]
    fn rules() {
        assert!(check_rule(&Rule::Positive, Scalar::Int(0)).is_some());
        assert!(check_rule(&Rule::Positive, Scalar::Int(1)).is_none());
        assert!(check_rule(&Rule::NonZero, Scalar::Int(-3)).is_none());
        assert!(check_rule(&Rule::NonNegative, Scalar::Cents(-1)).is_some());
        assert!(check_rule(&Rule::OneOf(vec!["a"]), Scalar::Str("b")).is_some());
        assert!(check_rule(&Rule::NonEmpty, Scalar::Str("")).is_some());
    }
}

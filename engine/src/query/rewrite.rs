//! Time-travel syntax, rewritten before DataFusion parses a statement:
//!
//! - `orders VERSION AS OF 3` becomes `table_at_version('orders', 3) AS orders`;
//! - `orders TIMESTAMP AS OF '2026-11-25T10:00:00Z'` becomes `table_at_time(…) AS orders`;
//! - every time-travel call without an alias gets a unique one. DataFusion names the scan
//!   of a table function after the function, so two unaliased calls in one statement
//!   would otherwise look like the same relation to the optimizer.

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::{Keyword, RESERVED_FOR_TABLE_ALIAS};
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::QueryError;
use super::tables::TimeTravel;

/// Returns the statement with time-travel syntax in its table-function form.
pub(super) fn time_travel(sql: &str) -> Result<String, QueryError> {
    let lower = sql.to_ascii_lowercase();
    if !lower.contains(" as of") && !lower.contains("table_at_") {
        return Ok(sql.to_owned());
    }
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| QueryError::Invalid(e.to_string()))?;
    let mut out: Vec<String> = Vec::with_capacity(tokens.len());
    let mut aliases = 0;
    let mut i = 0;
    while i < tokens.len() {
        // `name VERSION AS OF n` / `name TIMESTAMP AS OF 'text'`
        if let Token::Word(table) = &tokens[i]
            && let Some((function, value, next)) = as_of_clause(&tokens, i + 1)
        {
            // A qualified name (`public.orders`): the stream is named by its last part.
            while out.last().is_some_and(|t| t == ".") {
                out.pop();
                out.pop();
            }
            out.push(format!(
                "{function}('{}', {value})",
                table.value.replace('\'', "''")
            ));
            if !has_alias(&tokens, next) {
                out.push(format!(" AS {}", table));
            }
            i = next;
            continue;
        }
        // `table_at_version(…)` / `table_at_time(…)` without an alias
        if let Token::Word(w) = &tokens[i]
            && (w.value.eq_ignore_ascii_case(TimeTravel::AT_VERSION)
                || w.value.eq_ignore_ascii_case(TimeTravel::AT_TIME))
            && let Some(close) = call_end(&tokens, i + 1)
        {
            for t in &tokens[i..=close] {
                out.push(t.to_string());
            }
            if !has_alias(&tokens, close + 1) {
                aliases += 1;
                out.push(format!(" AS {}_{aliases}", w.value.to_ascii_lowercase()));
            }
            i = close + 1;
            continue;
        }
        out.push(tokens[i].to_string());
        i += 1;
    }
    Ok(out.concat())
}

fn next_significant(tokens: &[Token], mut i: usize) -> usize {
    while i < tokens.len() && matches!(tokens[i], Token::Whitespace(_)) {
        i += 1;
    }
    i
}

fn is_keyword(token: Option<&Token>, keyword: Keyword) -> bool {
    matches!(token, Some(Token::Word(w)) if w.keyword == keyword)
}

/// Parses `VERSION AS OF <number>` or `TIMESTAMP AS OF '<text>'` from `start`; returns
/// the function to call, the argument text and where the clause ends.
fn as_of_clause(tokens: &[Token], start: usize) -> Option<(&'static str, String, usize)> {
    let kind = next_significant(tokens, start);
    let function = if is_keyword(tokens.get(kind), Keyword::VERSION) {
        TimeTravel::AT_VERSION
    } else if is_keyword(tokens.get(kind), Keyword::TIMESTAMP) {
        TimeTravel::AT_TIME
    } else {
        return None;
    };
    let as_ = next_significant(tokens, kind + 1);
    let of = next_significant(tokens, as_ + 1);
    if !is_keyword(tokens.get(as_), Keyword::AS) || !is_keyword(tokens.get(of), Keyword::OF) {
        return None;
    }
    let value = next_significant(tokens, of + 1);
    let text = match (function, tokens.get(value)?) {
        (TimeTravel::AT_VERSION, Token::Number(n, _)) => n.clone(),
        (TimeTravel::AT_TIME, t @ Token::SingleQuotedString(_)) => t.to_string(),
        _ => return None,
    };
    Some((function, text, value + 1))
}

/// Index of the `)` closing a call whose `(` is the next significant token.
fn call_end(tokens: &[Token], start: usize) -> Option<usize> {
    let open = next_significant(tokens, start);
    if tokens.get(open) != Some(&Token::LParen) {
        return None;
    }
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate().skip(open) {
        match t {
            Token::LParen => depth += 1,
            Token::RParen => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether the relation ending before `at` is followed by an alias.
fn has_alias(tokens: &[Token], at: usize) -> bool {
    match tokens.get(next_significant(tokens, at)) {
        Some(Token::Word(w)) => {
            w.keyword == Keyword::AS || !RESERVED_FOR_TABLE_ALIAS.contains(&w.keyword)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_clauses_become_table_functions() {
        let r = |s: &str| time_travel(s).unwrap();
        assert_eq!(
            r("SELECT * FROM orders VERSION AS OF 3 WHERE quantity > 1"),
            "SELECT * FROM table_at_version('orders', 3) AS orders WHERE quantity > 1"
        );
        assert_eq!(
            r("SELECT o.sku FROM orders TIMESTAMP AS OF '2026-11-25T10:00:00Z' o"),
            "SELECT o.sku FROM table_at_time('orders', '2026-11-25T10:00:00Z') o"
        );
        assert_eq!(
            r(
                "SELECT (SELECT COUNT(*) FROM table_at_version('orders', 1)), (SELECT COUNT(*) FROM table_at_version('orders', 2) AS b)"
            ),
            "SELECT (SELECT COUNT(*) FROM table_at_version('orders', 1) AS table_at_version_1), (SELECT COUNT(*) FROM table_at_version('orders', 2) AS b)"
        );
        assert_eq!(
            r("SELECT COUNT(*) FROM quiver.public.orders VERSION AS OF 2"),
            "SELECT COUNT(*) FROM table_at_version('orders', 2) AS orders"
        );
        // Untouched: no clause, or the words inside a string.
        let plain = "SELECT 'VERSION AS OF 3' AS v FROM orders";
        assert_eq!(r(plain), plain);
        assert_eq!(r("SELECT 1"), "SELECT 1");
    }
}

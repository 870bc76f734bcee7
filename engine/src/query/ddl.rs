//! Quiver's own DDL, recognised before DataFusion sees a statement:
//! `CREATE STREAM`, `CREATE MATERIALIZED VIEW` and `DROP MATERIALIZED VIEW`.

use datafusion::sql::sqlparser::ast::{ColumnOption, ObjectType, Statement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use super::QueryError;
use crate::schema::{ColumnDef, ColumnType, Rule, StreamSchema};

/// A parsed Quiver DDL statement.
#[derive(Debug, Clone)]
pub enum QuiverDdl {
    /// `CREATE STREAM [IF NOT EXISTS] name (col type [NOT NULL], ...)`.
    CreateStream {
        /// The new stream.
        schema: StreamSchema,
        /// Succeed without change when a stream of that name exists.
        if_not_exists: bool,
    },
    /// `CREATE MATERIALIZED VIEW [IF NOT EXISTS] name AS <query>`.
    CreateMaterializedView {
        /// View name.
        name: String,
        /// The defining query.
        sql: String,
        /// Succeed without change when a view of that name exists.
        if_not_exists: bool,
    },
    /// `EXPLAIN MATERIALIZED VIEW name`: how the view is maintained.
    ExplainMaterializedView {
        /// View name.
        name: String,
    },
    /// `DROP MATERIALIZED VIEW [IF EXISTS] name`.
    DropMaterializedView {
        /// View name.
        name: String,
        /// Succeed when the view does not exist.
        if_exists: bool,
    },
    /// `CREATE ALERT [IF NOT EXISTS] name ON view WHERE … [FOR …] …`.
    CreateAlert {
        /// The rule.
        rule: crate::alerts::AlertRule,
        /// Succeed without change when an alert of that name exists.
        if_not_exists: bool,
    },
    /// `DROP ALERT [IF EXISTS] name`.
    DropAlert {
        /// Alert name.
        name: String,
        /// Succeed when the alert does not exist.
        if_exists: bool,
    },
    /// `CREATE REPORT [IF NOT EXISTS] name [TITLE '…'] FORMAT f [SCHEDULE '…']
    /// [EMAIL 'a', …] AS <query>`: a report of one query (the HTTP API takes several,
    /// with charts).
    CreateReport {
        name: String,
        if_not_exists: bool,
        title: Option<String>,
        format: String,
        schedule: Option<String>,
        email: Vec<String>,
        /// The query after `AS`.
        sql: String,
    },
    /// `DROP REPORT [IF EXISTS] name`.
    DropReport {
        /// Report name.
        name: String,
        /// Succeed when the report does not exist.
        if_exists: bool,
    },
}

impl QuiverDdl {
    /// The statement's kind, for messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CreateStream { .. } => "CREATE STREAM",
            Self::CreateMaterializedView { .. } => "CREATE MATERIALIZED VIEW",
            Self::DropMaterializedView { .. } => "DROP MATERIALIZED VIEW",
            Self::ExplainMaterializedView { .. } => "EXPLAIN MATERIALIZED VIEW",
            Self::CreateAlert { .. } => "CREATE ALERT",
            Self::DropAlert { .. } => "DROP ALERT",
            Self::CreateReport { .. } => "CREATE REPORT",
            Self::DropReport { .. } => "DROP REPORT",
        }
    }

    /// Whether the statement changes anything (and so needs the admin scope).
    pub fn is_write(&self) -> bool {
        !matches!(self, Self::ExplainMaterializedView { .. })
    }
}

/// Longest statement accepted, in tokens. Planning recurses over expression trees, and a
/// statement's nesting can be as deep as it is long; this bound (with the query
/// runtime's large stacks) keeps a hostile `1 + 1 + … + 1` from exhausting a stack.
pub(super) const MAX_TOKENS: usize = 10_000;

/// Returns the statement if `sql` is Quiver DDL, `None` if it is anything else.
///
/// Also refuses statements longer than [`MAX_TOKENS`].
pub(super) fn parse(sql: &str) -> Result<Option<QuiverDdl>, QueryError> {
    let invalid = |e: &dyn std::fmt::Display| QueryError::Invalid(e.to_string());
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize()
        .map_err(|e| invalid(&e))?;
    let significant = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .count();
    if significant > MAX_TOKENS {
        return Err(QueryError::Invalid(format!(
            "the statement has {significant} tokens; the limit is {MAX_TOKENS}"
        )));
    }
    let words: Vec<String> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .take(4)
        .map(|t| match t {
            Token::Word(w) => w.value.to_ascii_uppercase(),
            _ => String::new(),
        })
        .collect();
    let lead: Vec<&str> = words.iter().map(String::as_str).collect();
    match lead.as_slice() {
        ["CREATE", "STREAM", ..] => parse_create_stream(sql).map(Some),
        ["CREATE", "ALERT", ..] => {
            // IF NOT EXISTS is taken off before the rule grammar sees the statement.
            let (sql, if_not_exists) = match lead.as_slice() {
                ["CREATE", "ALERT", "IF", "NOT"] => {
                    let at = find_words(sql, &["EXISTS"]).ok_or_else(|| {
                        QueryError::Invalid("expected CREATE ALERT IF NOT EXISTS name".into())
                    })?;
                    (format!("CREATE ALERT {}", &sql[at..]), true)
                }
                _ => (sql.to_owned(), false),
            };
            let rule = crate::alerts::parse_create_alert(&sql)
                .map_err(|e| QueryError::Invalid(format!("CREATE ALERT: {e}")))?;
            Ok(Some(QuiverDdl::CreateAlert {
                rule,
                if_not_exists,
            }))
        }
        ["CREATE", "REPORT", ..] => parse_create_report(&tokens).map(Some),
        ["DROP", "REPORT", ..] => {
            let (name, if_exists) = drop_target(&tokens, "DROP REPORT [IF EXISTS] name")?;
            Ok(Some(QuiverDdl::DropReport { name, if_exists }))
        }
        ["DROP", "ALERT", ..] => {
            let (name, if_exists) = drop_target(&tokens, "DROP ALERT [IF EXISTS] name")?;
            Ok(Some(QuiverDdl::DropAlert { name, if_exists }))
        }
        ["EXPLAIN", "MATERIALIZED", "VIEW", ..] => {
            let rest: Vec<&Token> = tokens
                .iter()
                .filter(|t| !matches!(t, Token::Whitespace(_) | Token::SemiColon))
                .skip(3)
                .collect();
            match rest.as_slice() {
                [Token::Word(w)] => Ok(Some(QuiverDdl::ExplainMaterializedView {
                    name: w.value.clone(),
                })),
                _ => Err(QueryError::Invalid(
                    "expected EXPLAIN MATERIALIZED VIEW name".into(),
                )),
            }
        }
        ["CREATE", "MATERIALIZED", "VIEW", ..] | ["DROP", "MATERIALIZED", "VIEW", ..] => {
            let mut statements = Parser::parse_sql(&dialect, sql).map_err(|e| invalid(&e))?;
            if statements.len() != 1 {
                return Err(QueryError::Invalid("send one statement per request".into()));
            }
            match statements.remove(0) {
                Statement::CreateView(view) if view.materialized => {
                    Ok(Some(QuiverDdl::CreateMaterializedView {
                        name: view.name.to_string(),
                        sql: view.query.to_string(),
                        if_not_exists: view.if_not_exists,
                    }))
                }
                Statement::Drop {
                    object_type: ObjectType::MaterializedView,
                    if_exists,
                    names,
                    ..
                } if names.len() == 1 => Ok(Some(QuiverDdl::DropMaterializedView {
                    name: names[0].to_string(),
                    if_exists,
                })),
                other => Err(QueryError::Invalid(format!(
                    "not a supported materialized view statement: {other}"
                ))),
            }
        }
        _ => Ok(None),
    }
}

/// Where the text after the last of `words` (matched in order, case-insensitively)
/// starts in `sql`.
fn find_words(sql: &str, words: &[&str]) -> Option<usize> {
    let upper = sql.to_ascii_uppercase();
    let mut at = 0;
    for w in words {
        at = upper[at..].find(w).map(|i| at + i + w.len())?;
    }
    Some(at)
}

/// The name (and `IF EXISTS`) of a `DROP <kind> [IF EXISTS] name` statement.
fn drop_target(tokens: &[Token], expected: &str) -> Result<(String, bool), QueryError> {
    let rest: Vec<String> = tokens
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_) | Token::SemiColon))
        .skip(2)
        .map(|t| match t {
            Token::Word(w) => w.value.clone(),
            other => other.to_string(),
        })
        .collect();
    let upper: Vec<String> = rest.iter().map(|w| w.to_ascii_uppercase()).collect();
    match (upper.as_slice(), rest.as_slice()) {
        ([i, e, _], [_, _, name]) if i == "IF" && e == "EXISTS" => Ok((name.clone(), true)),
        (_, [name]) => Ok((name.clone(), false)),
        _ => Err(QueryError::Invalid(format!("expected {expected}"))),
    }
}

/// `CREATE REPORT [IF NOT EXISTS] name [TITLE '…'] FORMAT f [SCHEDULE '…']
/// [EMAIL 'a', …] AS <query>`.
fn parse_create_report(tokens: &[Token]) -> Result<QuiverDdl, QueryError> {
    let err = |m: String| QueryError::Invalid(format!("CREATE REPORT: {m}"));
    let significant: Vec<(usize, &Token)> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !matches!(t, Token::Whitespace(_)))
        .collect();
    let word = |i: usize| match significant.get(i) {
        Some((_, Token::Word(w))) => Some(w.value.to_ascii_uppercase()),
        _ => None,
    };
    let mut at = 2;
    let if_not_exists = word(2).as_deref() == Some("IF");
    if if_not_exists {
        if word(3).as_deref() != Some("NOT") || word(4).as_deref() != Some("EXISTS") {
            return Err(err("expected IF NOT EXISTS".into()));
        }
        at = 5;
    }
    let name = match significant.get(at) {
        Some((_, Token::Word(w))) => w.value.clone(),
        _ => return Err(err("expected the report's name after CREATE REPORT".into())),
    };
    at += 1;
    let (mut title, mut format, mut schedule, mut email) = (None, None, None, Vec::new());
    let text = |i: usize, clause: &str| match significant.get(i) {
        Some((_, Token::SingleQuotedString(s))) => Ok(s.clone()),
        _ => Err(err(format!("{clause} takes a quoted string"))),
    };
    let query_from = loop {
        match word(at).as_deref() {
            Some("TITLE") => {
                title = Some(text(at + 1, "TITLE")?);
                at += 2;
            }
            Some("SCHEDULE") => {
                schedule = Some(text(at + 1, "SCHEDULE")?);
                at += 2;
            }
            Some("FORMAT") => {
                format = Some(
                    word(at + 1)
                        .ok_or_else(|| err("FORMAT takes csv, xlsx, pdf or parquet".into()))?,
                );
                at += 2;
            }
            Some("EMAIL") => {
                email.push(text(at + 1, "EMAIL")?);
                at += 2;
                while matches!(significant.get(at), Some((_, Token::Comma))) {
                    email.push(text(at + 1, "EMAIL")?);
                    at += 2;
                }
            }
            Some("AS") => break significant[at].0 + 1,
            _ => {
                let found = significant
                    .get(at)
                    .map_or_else(|| "the end".to_owned(), |(_, t)| format!("'{t}'"));
                return Err(err(format!(
                    "expected TITLE, FORMAT, SCHEDULE, EMAIL or AS, found {found}"
                )));
            }
        }
    };
    let sql: String = tokens[query_from..]
        .iter()
        .map(ToString::to_string)
        .collect();
    let sql = sql.trim().trim_end_matches(';').trim().to_owned();
    if sql.is_empty() {
        return Err(err("expected a query after AS".into()));
    }
    Ok(QuiverDdl::CreateReport {
        name,
        if_not_exists,
        title,
        format: format
            .ok_or_else(|| err("FORMAT is required (csv, xlsx, pdf or parquet)".into()))?
            .to_ascii_lowercase(),
        schedule,
        email,
        sql,
    })
}

/// `SHOW ALERTS` as the query over the `alerts` table it stands for.
pub(super) fn rewrite_show(sql: &str) -> Option<String> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    match words.as_slice() {
        [show, alerts] if show == "SHOW" && alerts == "ALERTS" => {
            Some("SELECT * FROM alerts ORDER BY name".into())
        }
        _ => None,
    }
}

fn parse_create_stream(sql: &str) -> Result<QuiverDdl, QueryError> {
    let invalid = |e: &dyn std::fmt::Display| {
        QueryError::Invalid(format!(
            "CREATE STREAM: {e}; expected CREATE STREAM [IF NOT EXISTS] name \
             (event_time TIMESTAMP NOT NULL, column type [NOT NULL], ...)"
        ))
    };
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| invalid(&e))?;
    parser
        .expect_keyword(Keyword::CREATE)
        .map_err(|e| invalid(&e))?;
    // STREAM is not a keyword of the SQL grammar; the caller has checked it is there.
    parser.next_token();
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parser
        .parse_object_name(false)
        .map_err(|e| invalid(&e))?
        .to_string();
    let (columns, constraints) = parser.parse_columns().map_err(|e| invalid(&e))?;
    let _ = parser.consume_token(&Token::SemiColon);
    if parser.peek_token().token != Token::EOF {
        return Err(invalid(&format!(
            "unexpected '{}' after the column list",
            parser.peek_token().token
        )));
    }
    if !constraints.is_empty() {
        return Err(invalid(
            &"table constraints (keys, checks) are not supported",
        ));
    }
    let mut defs = Vec::with_capacity(columns.len());
    for column in columns {
        let cname = column.name.value.clone();
        let ty = column_type(&column.data_type.to_string()).ok_or_else(|| {
            invalid(&format!(
                "column '{cname}' has type {}, which a stream cannot hold (use TEXT, BIGINT, \
                 DOUBLE, BOOLEAN, TIMESTAMP or DECIMAL(18,2))",
                column.data_type
            ))
        })?;
        let mut required = false;
        for option in &column.options {
            match option.option {
                ColumnOption::NotNull => required = true,
                ColumnOption::Null => required = false,
                _ => {
                    return Err(invalid(&format!(
                        "column '{cname}': only NOT NULL and NULL are supported, not '{}'",
                        option.option
                    )));
                }
            }
        }
        if defs.iter().any(|d: &ColumnDef| d.name == cname) {
            return Err(invalid(&format!("column '{cname}' is declared twice")));
        }
        defs.push(ColumnDef {
            name: cname,
            ty,
            required,
            rule: Rule::None,
        });
    }
    let schema = StreamSchema::try_new(&name, defs).map_err(|e| invalid(&e))?;
    Ok(QuiverDdl::CreateStream {
        schema,
        if_not_exists,
    })
}

/// The name and query of a `CREATE MATERIALIZED VIEW` statement.
pub fn parse_view_definition(sql: &str) -> Result<(String, String), QueryError> {
    match parse(sql)? {
        Some(QuiverDdl::CreateMaterializedView { name, sql, .. }) => Ok((name, sql)),
        _ => Err(QueryError::Invalid(
            "expected CREATE MATERIALIZED VIEW name AS <query>".into(),
        )),
    }
}

/// Maps a SQL type name to a stream column type.
pub fn column_type(sql_type: &str) -> Option<ColumnType> {
    let t = sql_type.to_ascii_lowercase().replace(' ', "");
    let base = t.split('(').next().unwrap_or_default();
    Some(match base {
        "text" | "string" | "varchar" | "charactervarying" | "utf8" => ColumnType::Utf8,
        "bigint" | "int" | "integer" | "int8" | "int64" => ColumnType::Int64,
        "double" | "doubleprecision" | "float" | "float8" | "float64" | "real" => {
            ColumnType::Float64
        }
        "boolean" | "bool" => ColumnType::Boolean,
        "timestamp" | "timestamptz" | "timestampwithtimezone" => ColumnType::Timestamp,
        "decimal" | "numeric" if t.ends_with("(18,2)") => ColumnType::Money,
        _ => return None,
    })
}

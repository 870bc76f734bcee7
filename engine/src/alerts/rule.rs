//! `CREATE ALERT` parsed into a rule.
//!
//! ```sql
//! CREATE ALERT name ON view WHERE <predicate on the view's columns>
//!   [FOR <duration>] [KEEP FIRING FOR <duration>] [SEVERITY info|warning|critical]
//!   [NOTIFY webhook '<url>' [SECRET 'whsec_…'] | email '<address>' [, ...]]
//! ```
//!
//! A duration is `5m`, `'90s'`, `INTERVAL '5 minutes'` or `30 seconds`.

use std::time::Duration;

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::Token;
use serde::{Deserialize, Serialize};

use super::Timers;

/// How much an alert matters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// For the record.
    Info,
    /// Someone should look (the default).
    #[default]
    Warning,
    /// Someone should act now.
    Critical,
}

/// Where a rule's transitions are sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Destination {
    /// An HTTP endpoint that receives a signed JSON POST.
    Webhook {
        /// `http://` or `https://` URL.
        url: String,
        /// The signing secret (`whsec_` and base64), given with `SECRET '…'` or made
        /// when the rule is created.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// A mailbox, through the server's SMTP relay.
    Email {
        /// The address.
        address: String,
    },
}

/// An alert rule as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRule {
    /// Rule name.
    pub name: String,
    /// The view it watches.
    pub view: String,
    /// The predicate, as SQL over the view's columns.
    pub predicate: String,
    /// `FOR` and `KEEP FIRING FOR`.
    pub timers: Timers,
    /// Severity.
    pub severity: Severity,
    /// Destinations, in order.
    pub notify: Vec<Destination>,
}

/// Parses a `CREATE ALERT` statement; the message says what is wrong and where.
pub fn parse_create_alert(sql: &str) -> Result<AlertRule, String> {
    let dialect = GenericDialect {};
    let mut p = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| e.to_string())?;
    expect_word(&mut p, "CREATE")?;
    expect_word(&mut p, "ALERT")?;
    let name = p
        .parse_identifier()
        .map_err(|e| format!("alert name: {e}"))?
        .value;
    p.expect_keyword(Keyword::ON)
        .map_err(|e| format!("after the alert name: {e}"))?;
    let view = p
        .parse_identifier()
        .map_err(|e| format!("view name: {e}"))?
        .value;
    p.expect_keyword(Keyword::WHERE)
        .map_err(|e| format!("after the view name: {e}"))?;
    let predicate = p
        .parse_expr()
        .map_err(|e| format!("in the WHERE predicate: {e}"))?
        .to_string();
    let mut rule = AlertRule {
        name,
        view,
        predicate,
        timers: Timers::default(),
        severity: Severity::default(),
        notify: Vec::new(),
    };
    let mut seen = Vec::new();
    loop {
        let token = p.next_token().token;
        let word = match &token {
            Token::EOF => break,
            Token::SemiColon => {
                if p.peek_token().token != Token::EOF {
                    return Err("send one statement per request".into());
                }
                break;
            }
            Token::Word(w) => w.value.to_ascii_uppercase(),
            other => return Err(format!("unexpected '{other}' after the predicate")),
        };
        if seen.contains(&word) {
            return Err(format!("{word} is given twice"));
        }
        seen.push(word.clone());
        match word.as_str() {
            "FOR" => rule.timers.for_ms = millis(duration(&mut p, "FOR")?),
            "KEEP" => {
                expect_word(&mut p, "FIRING")?;
                expect_word(&mut p, "FOR")?;
                rule.timers.keep_firing_for_ms = millis(duration(&mut p, "KEEP FIRING FOR")?);
            }
            "SEVERITY" => {
                rule.severity = match next_word(&mut p).as_deref() {
                    Some("INFO") => Severity::Info,
                    Some("WARNING") => Severity::Warning,
                    Some("CRITICAL") => Severity::Critical,
                    _ => return Err("SEVERITY is info, warning or critical".into()),
                }
            }
            "NOTIFY" => loop {
                let kind = next_word(&mut p);
                let target = match p.next_token().token {
                    Token::SingleQuotedString(s) => s,
                    other => {
                        return Err(format!(
                            "NOTIFY {} needs a quoted target, not '{other}'",
                            kind.as_deref().unwrap_or("")
                        ));
                    }
                };
                rule.notify.push(match kind.as_deref() {
                    Some("WEBHOOK") => {
                        if !(target.starts_with("http://") || target.starts_with("https://")) {
                            return Err(format!("webhook '{target}' is not an http(s) URL"));
                        }
                        let secret = if next_is_word(&mut p, "SECRET") {
                            p.next_token();
                            match p.next_token().token {
                                Token::SingleQuotedString(s) => Some(s),
                                other => {
                                    return Err(format!(
                                        "SECRET needs a quoted value, not '{other}'"
                                    ));
                                }
                            }
                        } else {
                            None
                        };
                        Destination::Webhook {
                            url: target,
                            secret,
                        }
                    }
                    Some("EMAIL") => {
                        if !target.contains('@') {
                            return Err(format!("'{target}' is not an email address"));
                        }
                        Destination::Email { address: target }
                    }
                    _ => return Err("NOTIFY takes webhook '<url>' or email '<address>'".into()),
                });
                if !p.consume_token(&Token::Comma) {
                    break;
                }
            },
            other => {
                return Err(format!(
                    "unexpected {other}: expected FOR, KEEP FIRING FOR, SEVERITY or NOTIFY"
                ));
            }
        }
    }
    Ok(rule)
}

fn next_is_word(p: &mut Parser<'_>, want: &str) -> bool {
    matches!(p.peek_token().token, Token::Word(w) if w.value.eq_ignore_ascii_case(want))
}

fn next_word(p: &mut Parser<'_>) -> Option<String> {
    match p.next_token().token {
        Token::Word(w) => Some(w.value.to_ascii_uppercase()),
        _ => None,
    }
}

fn expect_word(p: &mut Parser<'_>, want: &str) -> Result<(), String> {
    let got = p.next_token().token;
    match &got {
        Token::Word(w) if w.value.eq_ignore_ascii_case(want) => Ok(()),
        _ => Err(format!("expected {want}, found '{got}'")),
    }
}

/// `5m`, `5 minutes`, `'5m'` or `INTERVAL '5 minutes'`.
fn duration(p: &mut Parser<'_>, clause: &str) -> Result<Duration, String> {
    let text = match p.next_token().token {
        Token::Word(w) if w.value.eq_ignore_ascii_case("INTERVAL") => match p.next_token().token {
            Token::SingleQuotedString(s) => s,
            other => {
                return Err(format!(
                    "{clause}: INTERVAL needs a quoted length, not '{other}'"
                ));
            }
        },
        Token::SingleQuotedString(s) => s,
        Token::Number(n, _) => match p.peek_token().token {
            Token::Word(w) if !is_clause(&w.value) => {
                p.next_token();
                format!("{n}{}", w.value)
            }
            _ => return Err(format!("{clause} {n}: give a unit, e.g. {n}s or {n}m")),
        },
        other => {
            return Err(format!(
                "{clause}: expected a duration such as 5m, not '{other}'"
            ));
        }
    };
    humantime::parse_duration(text.trim()).map_err(|e| format!("{clause} '{text}': {e}"))
}

fn is_clause(word: &str) -> bool {
    ["FOR", "KEEP", "SEVERITY", "NOTIFY"]
        .iter()
        .any(|c| word.eq_ignore_ascii_case(c))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_rule_parses() {
        let rule = parse_create_alert(
            "CREATE ALERT low_w1 ON low_stock WHERE on_hand < 5 AND warehouse_id = 'W1' \
             FOR 5m KEEP FIRING FOR INTERVAL '30 seconds' SEVERITY critical \
             NOTIFY webhook 'http://127.0.0.1:9000/hook' SECRET 'whsec_c2VjcmV0', email 'ops@example.com';",
        )
        .unwrap();
        assert_eq!(rule.name, "low_w1");
        assert_eq!(rule.view, "low_stock");
        assert_eq!(rule.predicate, "on_hand < 5 AND warehouse_id = 'W1'");
        assert_eq!(
            rule.timers,
            Timers {
                for_ms: 300_000,
                keep_firing_for_ms: 30_000
            }
        );
        assert_eq!(rule.severity, Severity::Critical);
        assert_eq!(
            rule.notify,
            [
                Destination::Webhook {
                    url: "http://127.0.0.1:9000/hook".into(),
                    secret: Some("whsec_c2VjcmV0".into()),
                },
                Destination::Email {
                    address: "ops@example.com".into()
                }
            ]
        );
        let bare = parse_create_alert("create alert a on v where x > 1").unwrap();
        assert_eq!(
            (bare.timers, bare.severity, bare.notify.len()),
            (Timers::default(), Severity::Warning, 0)
        );
        assert_eq!(
            parse_create_alert("CREATE ALERT a ON v WHERE x > 1 FOR 90 seconds")
                .unwrap()
                .timers
                .for_ms,
            90_000
        );
    }

    #[test]
    fn bad_rules_say_what_and_where() {
        for (sql, says) in [
            ("CREATE ALERT a ON v", "after the view name"),
            ("CREATE ALERT a ON v WHERE", "in the WHERE predicate"),
            ("CREATE ALERT a ON v WHERE x > 1 FOR 5", "give a unit"),
            ("CREATE ALERT a ON v WHERE x > 1 FOR 'soon'", "FOR 'soon'"),
            (
                "CREATE ALERT a ON v WHERE x > 1 SEVERITY loud",
                "info, warning or critical",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1 NOTIFY webhook 'ftp://x'",
                "not an http(s) URL",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1 NOTIFY email 'nobody'",
                "not an email address",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1 NOTIFY pager 'x'",
                "webhook '<url>' or email",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1 FOR 1m FOR 2m",
                "FOR is given twice",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1 LIMIT 3",
                "unexpected LIMIT",
            ),
            (
                "CREATE ALERT a ON v WHERE x > 1; DROP VIEW v",
                "one statement",
            ),
        ] {
            let e = parse_create_alert(sql).expect_err(sql);
            assert!(e.contains(says), "{sql}: {e}");
        }
    }
}

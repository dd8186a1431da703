//! Statement parsing. Shardline's own grammar (cluster statements, `CREATE DATABASE ...
//! PARTITIONS n`, `SET`, `SHOW`) is parsed with sqlparser-rs's `Parser` primitives; queries
//! are parsed by sqlparser-rs itself.

use super::result::SqlError;
use sqlparser::ast::{Expr, Query, Statement};
use sqlparser::dialect::MySqlDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

/// Variable scope in `SET` and `SHOW VARIABLES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Global,
    Session,
}

/// One `name = value` of a `SET`.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub scope: Scope,
    /// `@name` user variables are kept with their `@`.
    pub name: String,
    pub value: Expr,
}

/// A parsed statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Stmt {
    CreateDatabase {
        name: String,
        if_not_exists: bool,
        partitions: Option<u32>,
    },
    DropDatabase {
        name: String,
        if_exists: bool,
    },
    Use {
        database: String,
    },
    Set(Vec<Assignment>),
    /// `SET NAMES`, `SET CHARACTER SET`: accepted, the connection is always utf8mb4.
    SetNames,
    ShowDatabases {
        like: Option<String>,
    },
    ShowTables {
        like: Option<String>,
    },
    ShowVariables {
        scope: Scope,
        like: Option<String>,
    },
    ShowLeaves,
    ShowAggregators,
    ShowPartitions {
        database: Option<String>,
    },
    ShowWarnings,
    /// `BEGIN`, `COMMIT`, `ROLLBACK`: every statement commits on its own.
    Transaction,
    Select(Box<Query>),
}

fn word_is(tok: &Token, word: &str) -> bool {
    matches!(tok, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// Parses one statement (a trailing `;` is allowed).
pub fn parse(sql: &str) -> Result<Stmt, SqlError> {
    let trimmed = sql.trim().trim_end_matches(';').trim();
    if trimmed.is_empty() {
        return Err(SqlError::new(
            super::result::codes::EMPTY_QUERY,
            "Query was empty",
        ));
    }
    let dialect = MySqlDialect {};
    let mut p = Parser::new(&dialect)
        .try_with_sql(trimmed)
        .map_err(SqlError::parse)?;
    let stmt = parse_stmt(&mut p, trimmed).map_err(SqlError::parse)??;
    if p.peek_token().token != Token::EOF {
        return Err(SqlError::parse(format!(
            "unexpected '{}' after the end of the statement",
            p.peek_token().token
        )));
    }
    Ok(stmt)
}

type Parsed = Result<Result<Stmt, SqlError>, ParserError>;

fn parse_stmt(p: &mut Parser, sql: &str) -> Parsed {
    let first = p.peek_token().token;
    if p.parse_keyword(Keyword::CREATE) {
        if p.parse_one_of_keywords(&[Keyword::DATABASE, Keyword::SCHEMA])
            .is_some()
        {
            let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
            let name = p.parse_identifier()?.value;
            let partitions = if p.parse_keyword(Keyword::PARTITIONS) {
                let n = p.parse_literal_uint()?;
                Some(u32::try_from(n).map_err(|_| {
                    ParserError::ParserError(format!("PARTITIONS {n} is too large"))
                })?)
            } else {
                None
            };
            return Ok(Ok(Stmt::CreateDatabase {
                name,
                if_not_exists,
                partitions,
            }));
        }
        return unsupported_or_error(sql);
    }
    if p.parse_keyword(Keyword::DROP) {
        if p.parse_one_of_keywords(&[Keyword::DATABASE, Keyword::SCHEMA])
            .is_some()
        {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = p.parse_identifier()?.value;
            return Ok(Ok(Stmt::DropDatabase { name, if_exists }));
        }
        return unsupported_or_error(sql);
    }
    if p.parse_keyword(Keyword::USE) {
        let database = p.parse_identifier()?.value;
        return Ok(Ok(Stmt::Use { database }));
    }
    if p.parse_keyword(Keyword::SET) {
        return parse_set(p).map(Ok);
    }
    if p.parse_keyword(Keyword::SHOW) {
        return parse_show(p, sql);
    }
    if p.parse_one_of_keywords(&[Keyword::BEGIN, Keyword::COMMIT, Keyword::ROLLBACK])
        .is_some()
        || p.parse_keywords(&[Keyword::START, Keyword::TRANSACTION])
    {
        let _ = p.parse_keyword(Keyword::WORK);
        return Ok(Ok(Stmt::Transaction));
    }
    if matches!(&first, Token::Word(w) if w.keyword == Keyword::SELECT) || first == Token::LParen {
        return match p.parse_statement()? {
            Statement::Query(q) => Ok(Ok(Stmt::Select(q))),
            other => Ok(Err(SqlError::unsupported(kind_of(&other)))),
        };
    }
    unsupported_or_error(sql)
}

/// For statements outside our grammar: a syntax error if sqlparser cannot parse them either,
/// otherwise "not supported".
fn unsupported_or_error(sql: &str) -> Parsed {
    let dialect = MySqlDialect {};
    match Parser::parse_sql(&dialect, sql) {
        Err(e) => Err(e),
        Ok(stmts) => Ok(Err(SqlError::unsupported(
            stmts.first().map(kind_of).unwrap_or_default(),
        ))),
    }
}

/// A short name of a statement's kind, e.g. `CREATE TABLE`.
fn kind_of(stmt: &Statement) -> String {
    let text = stmt.to_string();
    text.split_whitespace()
        .take_while(|w| w.chars().all(|c| c.is_ascii_alphabetic()) && w.to_ascii_uppercase() == *w)
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_like(p: &mut Parser) -> Result<Option<String>, ParserError> {
    if p.parse_keyword(Keyword::LIKE) {
        Ok(Some(p.parse_literal_string()?))
    } else {
        Ok(None)
    }
}

fn parse_show(p: &mut Parser, sql: &str) -> Parsed {
    let scope = match p.parse_one_of_keywords(&[Keyword::GLOBAL, Keyword::SESSION, Keyword::LOCAL])
    {
        Some(Keyword::GLOBAL) => Some(Scope::Global),
        Some(_) => Some(Scope::Session),
        None => None,
    };
    if p.parse_keyword(Keyword::VARIABLES) {
        let like = parse_like(p)?;
        return Ok(Ok(Stmt::ShowVariables {
            scope: scope.unwrap_or(Scope::Session),
            like,
        }));
    }
    if scope.is_some() {
        return p.expected("VARIABLES", p.peek_token());
    }
    if p.parse_one_of_keywords(&[Keyword::DATABASES, Keyword::SCHEMAS])
        .is_some()
    {
        return Ok(Ok(Stmt::ShowDatabases {
            like: parse_like(p)?,
        }));
    }
    if p.parse_keyword(Keyword::TABLES) {
        return Ok(Ok(Stmt::ShowTables {
            like: parse_like(p)?,
        }));
    }
    if p.parse_keyword(Keyword::PARTITIONS) {
        let database = if p.parse_keyword(Keyword::ON) {
            Some(p.parse_identifier()?.value)
        } else {
            None
        };
        return Ok(Ok(Stmt::ShowPartitions { database }));
    }
    let next = p.peek_token().token;
    for (word, stmt) in [
        ("LEAVES", Stmt::ShowLeaves),
        ("AGGREGATORS", Stmt::ShowAggregators),
        ("WARNINGS", Stmt::ShowWarnings),
        ("ERRORS", Stmt::ShowWarnings),
    ] {
        if word_is(&next, word) {
            p.next_token();
            return Ok(Ok(stmt));
        }
    }
    Err(ParserError::ParserError(format!(
        "unknown SHOW statement '{}'",
        sql.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    )))
}

fn parse_set(p: &mut Parser) -> Result<Stmt, ParserError> {
    if p.parse_keyword(Keyword::NAMES)
        || p.parse_keywords(&[Keyword::CHARACTER, Keyword::SET])
        || p.parse_keyword(Keyword::CHARSET)
    {
        // The charset (and an optional COLLATE) are accepted and ignored: we speak utf8mb4.
        let _ = p.parse_expr()?;
        if p.parse_keyword(Keyword::COLLATE) {
            let _ = p.parse_expr()?;
        }
        return Ok(Stmt::SetNames);
    }
    let mut assignments = Vec::new();
    loop {
        let mut scope =
            match p.parse_one_of_keywords(&[Keyword::GLOBAL, Keyword::SESSION, Keyword::LOCAL]) {
                Some(Keyword::GLOBAL) => Scope::Global,
                _ => Scope::Session,
            };
        let tok = p.next_token();
        let Token::Word(w) = &tok.token else {
            return p.expected("a variable name", tok);
        };
        let mut name = w.value.clone();
        if let Some(rest) = name.strip_prefix("@@") {
            let rest = rest.to_ascii_lowercase();
            if matches!(rest.as_str(), "global" | "session" | "local")
                && p.consume_token(&Token::Period)
            {
                scope = if rest == "global" {
                    Scope::Global
                } else {
                    Scope::Session
                };
                name = p.parse_identifier()?.value;
            } else {
                name = rest;
            }
        }
        if !p.consume_token(&Token::Eq) && !p.consume_token(&Token::Assignment) {
            return p.expected("= after the variable name", p.peek_token());
        }
        let value = p.parse_expr()?;
        assignments.push(Assignment { scope, name, value });
        if !p.consume_token(&Token::Comma) {
            break;
        }
    }
    Ok(Stmt::Set(assignments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_statements() {
        assert_eq!(
            parse("CREATE DATABASE IF NOT EXISTS `my db` PARTITIONS 8;").unwrap(),
            Stmt::CreateDatabase {
                name: "my db".into(),
                if_not_exists: true,
                partitions: Some(8)
            }
        );
        assert_eq!(
            parse("drop schema if exists d").unwrap(),
            Stmt::DropDatabase {
                name: "d".into(),
                if_exists: true
            }
        );
        assert_eq!(
            parse("use d").unwrap(),
            Stmt::Use {
                database: "d".into()
            }
        );
        assert!(parse("CREATE DATABASE").is_err());
        assert!(parse("CREATE DATABASE d PARTITIONS x").is_err());
    }

    #[test]
    fn set_forms() {
        let Stmt::Set(a) =
            parse(r#"SET GLOBAL experimental_features_config = "kafka_connect_enabled=true""#)
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(a[0].scope, Scope::Global);
        assert_eq!(a[0].name, "experimental_features_config");
        let Stmt::Set(a) = parse("SET @@global.x = 1, @@session.y := 2, autocommit=0").unwrap()
        else {
            panic!()
        };
        let got: Vec<_> = a.iter().map(|a| (a.scope, a.name.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (Scope::Global, "x"),
                (Scope::Session, "y"),
                (Scope::Session, "autocommit")
            ]
        );
        assert_eq!(
            parse("SET NAMES utf8mb4 COLLATE utf8mb4_bin").unwrap(),
            Stmt::SetNames
        );
        assert_eq!(parse("set names 'utf8'").unwrap(), Stmt::SetNames);
        assert!(parse("SET x").is_err());
    }

    #[test]
    fn show_forms() {
        assert_eq!(
            parse("SHOW VARIABLES LIKE 'experimental_features_config'").unwrap(),
            Stmt::ShowVariables {
                scope: Scope::Session,
                like: Some("experimental_features_config".into())
            }
        );
        assert_eq!(
            parse("show global variables").unwrap(),
            Stmt::ShowVariables {
                scope: Scope::Global,
                like: None
            }
        );
        assert_eq!(parse("SHOW LEAVES").unwrap(), Stmt::ShowLeaves);
        assert_eq!(parse("show aggregators;").unwrap(), Stmt::ShowAggregators);
        assert_eq!(
            parse("SHOW PARTITIONS ON d").unwrap(),
            Stmt::ShowPartitions {
                database: Some("d".into())
            }
        );
        assert_eq!(
            parse("SHOW DATABASES").unwrap(),
            Stmt::ShowDatabases { like: None }
        );
        assert!(parse("SHOW GLOBAL LEAVES").is_err());
    }

    #[test]
    fn errors_and_unsupported() {
        assert_eq!(
            parse("SELEC 1").unwrap_err().code,
            super::super::result::codes::PARSE
        );
        assert_eq!(
            parse("   ").unwrap_err().code,
            super::super::result::codes::EMPTY_QUERY
        );
        let e = parse("CREATE TABLE t (a INT)").unwrap_err();
        assert_eq!(e.code, super::super::result::codes::NOT_SUPPORTED_YET);
        assert!(e.message.contains("CREATE TABLE"), "{}", e.message);
        assert!(parse("SELECT 1 garbage garbage").is_err());
        assert!(matches!(
            parse("select @@version_comment limit 1").unwrap(),
            Stmt::Select(_)
        ));
    }
}

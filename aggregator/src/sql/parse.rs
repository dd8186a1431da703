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
    /// `ADD AGGREGATOR id 'host':port`: a new Raft member, by the gRPC address it will listen at.
    AddAggregator {
        node: u64,
        grpc_address: String,
    },
    /// `REMOVE AGGREGATOR id` or `REMOVE AGGREGATOR 'host':port` (its gRPC or MySQL address).
    RemoveAggregator {
        target: AggregatorRef,
    },
    /// `REBALANCE PARTITIONS [ON db]`.
    RebalancePartitions {
        database: Option<String>,
    },
    ShowWarnings,
    /// `BEGIN`, `COMMIT`, `ROLLBACK`: every statement commits on its own.
    Transaction,
    Select(Box<Query>),
    CreatePipeline(Box<CreatePipeline>),
    StartPipeline {
        /// `None`: START ALL PIPELINES (or FAILED ones).
        name: Option<String>,
        if_not_running: bool,
        failed_only: bool,
        /// `Some(limit)` for FOREGROUND [LIMIT n BATCHES].
        foreground: Option<Option<u64>>,
    },
    StopPipeline {
        /// `None`: STOP ALL PIPELINES.
        name: Option<String>,
        if_running: bool,
    },
    DropPipeline {
        name: String,
        if_exists: bool,
    },
    AlterPipeline {
        name: String,
        change: AlterPipeline,
    },
    TestPipeline {
        name: String,
        limit: Option<u64>,
    },
    ShowPipelines,
    ShowCreatePipeline {
        name: String,
    },
    ClearPipelineErrors,
    ShowCreateTable {
        name: String,
    },
    Describe {
        name: String,
    },
    CreateTable(Box<sqlparser::ast::CreateTable>),
    DropTable {
        name: String,
        if_exists: bool,
    },
    CreateIndex {
        name: String,
        table: String,
        column: String,
    },
    DropIndex {
        name: String,
        table: String,
    },
    /// `ALTER TABLE t ADD [COLUMN] c [AS <expr> PERSISTED] <type>`.
    AddColumn {
        table: String,
        name: String,
        data_type: sqlparser::ast::DataType,
        computed: Option<String>,
    },
}

/// An aggregator named in REMOVE AGGREGATOR.
#[derive(Debug, Clone, PartialEq)]
pub enum AggregatorRef {
    Id(u64),
    Address(String),
}

/// `'host':port`, `'host:port'` or `host:port` as a string.
fn parse_host_port(p: &mut Parser) -> Result<String, ParserError> {
    let host = p.parse_literal_string()?;
    if p.consume_token(&Token::Colon) {
        let port = p.parse_literal_uint()?;
        return Ok(format!("{host}:{port}"));
    }
    Ok(host)
}

/// `CREATE [OR REPLACE] [INFERRED] PIPELINE ... AS LOAD DATA KAFKACONNECT ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreatePipeline {
    pub or_replace: bool,
    pub inferred: bool,
    pub if_not_exists: bool,
    pub name: String,
    pub source: String,
    pub connector: String,
    pub config: String,
    pub credentials: Option<String>,
    pub batch_interval: Option<u64>,
    pub max_retries: Option<u64>,
    pub stop_on_error: Option<bool>,
    pub table: Option<String>,
    pub format: Option<String>,
}

/// What `ALTER PIPELINE name SET ...` changes.
#[derive(Debug, Clone, PartialEq)]
pub enum AlterPipeline {
    OffsetsEarliest,
    OffsetsLatest,
    OffsetsJson(String),
    BatchInterval(u64),
    Config(String),
    Credentials(String),
    MaxRetries(u64),
    StopOnError(bool),
}

/// Consumes `word` (keyword or not) if it is next.
fn eat(p: &mut Parser, word: &str) -> bool {
    if word_is(&p.peek_token().token, word) {
        p.next_token();
        true
    } else {
        false
    }
}

fn expect(p: &mut Parser, word: &str) -> Result<(), ParserError> {
    if eat(p, word) {
        Ok(())
    } else {
        p.expected(word, p.peek_token())
    }
}

fn parse_on_off(p: &mut Parser) -> Result<bool, ParserError> {
    if eat(p, "ON") || eat(p, "TRUE") {
        Ok(true)
    } else if eat(p, "OFF") || eat(p, "FALSE") {
        Ok(false)
    } else {
        p.expected("ON or OFF", p.peek_token())
    }
}

fn parse_create_pipeline(
    p: &mut Parser,
    or_replace: bool,
    inferred: bool,
) -> Result<Stmt, ParserError> {
    let if_not_exists = p.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = p.parse_identifier()?.value;
    expect(p, "AS")?;
    expect(p, "LOAD")?;
    expect(p, "DATA")?;
    let source_tok = p.next_token();
    let Token::Word(source) = &source_tok.token else {
        return p.expected("a source type such as KAFKACONNECT", source_tok);
    };
    let source = source.value.to_ascii_uppercase();
    let connector = p.parse_literal_string()?;
    let mut c = CreatePipeline {
        or_replace,
        inferred,
        if_not_exists,
        name,
        source,
        connector,
        config: String::new(),
        credentials: None,
        batch_interval: None,
        max_retries: None,
        stop_on_error: None,
        table: None,
        format: None,
    };
    let mut saw_config = false;
    loop {
        if eat(p, "CONFIG") {
            c.config = p.parse_literal_string()?;
            saw_config = true;
        } else if eat(p, "CREDENTIALS") {
            c.credentials = Some(p.parse_literal_string()?);
        } else if eat(p, "BATCH_INTERVAL") {
            c.batch_interval = Some(p.parse_literal_uint()?);
        } else if eat(p, "MAX_RETRIES_PER_BATCH_PARTITION") {
            c.max_retries = Some(p.parse_literal_uint()?);
        } else if eat(p, "STOP_ON_ERROR") {
            c.stop_on_error = Some(parse_on_off(p)?);
        } else if eat(p, "INTO") {
            expect(p, "TABLE")?;
            c.table = Some(p.parse_identifier()?.value);
        } else if eat(p, "FORMAT") {
            let tok = p.next_token();
            let Token::Word(w) = &tok.token else {
                return p.expected("a format such as AVRO", tok);
            };
            c.format = Some(w.value.to_ascii_uppercase());
        } else {
            break;
        }
    }
    if !saw_config {
        return p.expected("CONFIG '<json>'", p.peek_token());
    }
    Ok(Stmt::CreatePipeline(Box::new(c)))
}

fn parse_pipeline_stmt(p: &mut Parser) -> Result<Option<Stmt>, ParserError> {
    if eat(p, "START") {
        let all = eat(p, "ALL");
        let failed_only = !all && eat(p, "FAILED");
        if all || failed_only {
            expect(p, "PIPELINES")?;
            return Ok(Some(Stmt::StartPipeline {
                name: None,
                if_not_running: true,
                failed_only,
                foreground: None,
            }));
        }
        expect(p, "PIPELINE")?;
        let if_not_running = if eat(p, "IF") {
            expect(p, "NOT")?;
            expect(p, "RUNNING")?;
            true
        } else {
            false
        };
        let name = p.parse_identifier()?.value;
        let foreground = if eat(p, "FOREGROUND") {
            if eat(p, "LIMIT") {
                let n = p.parse_literal_uint()?;
                expect(p, "BATCHES")?;
                Some(Some(n))
            } else {
                Some(None)
            }
        } else {
            None
        };
        return Ok(Some(Stmt::StartPipeline {
            name: Some(name),
            if_not_running,
            failed_only: false,
            foreground,
        }));
    }
    if eat(p, "STOP") {
        if eat(p, "ALL") {
            expect(p, "PIPELINES")?;
            return Ok(Some(Stmt::StopPipeline {
                name: None,
                if_running: true,
            }));
        }
        expect(p, "PIPELINE")?;
        let if_running = if eat(p, "IF") {
            expect(p, "RUNNING")?;
            true
        } else {
            false
        };
        let name = p.parse_identifier()?.value;
        return Ok(Some(Stmt::StopPipeline {
            name: Some(name),
            if_running,
        }));
    }
    if eat(p, "TEST") {
        expect(p, "PIPELINE")?;
        let name = p.parse_identifier()?.value;
        let limit = if eat(p, "LIMIT") {
            Some(p.parse_literal_uint()?)
        } else {
            None
        };
        return Ok(Some(Stmt::TestPipeline { name, limit }));
    }
    if eat(p, "CLEAR") {
        expect(p, "PIPELINE")?;
        expect(p, "ERRORS")?;
        return Ok(Some(Stmt::ClearPipelineErrors));
    }
    Ok(None)
}

fn parse_alter_pipeline(p: &mut Parser) -> Result<Stmt, ParserError> {
    let name = p.parse_identifier()?.value;
    expect(p, "SET")?;
    let change = if eat(p, "OFFSETS") {
        if eat(p, "EARLIEST") {
            AlterPipeline::OffsetsEarliest
        } else if eat(p, "LATEST") {
            AlterPipeline::OffsetsLatest
        } else {
            AlterPipeline::OffsetsJson(p.parse_literal_string()?)
        }
    } else if eat(p, "BATCH_INTERVAL") {
        AlterPipeline::BatchInterval(p.parse_literal_uint()?)
    } else if eat(p, "CONFIG") {
        AlterPipeline::Config(p.parse_literal_string()?)
    } else if eat(p, "CREDENTIALS") {
        AlterPipeline::Credentials(p.parse_literal_string()?)
    } else if eat(p, "MAX_RETRIES_PER_BATCH_PARTITION") {
        AlterPipeline::MaxRetries(p.parse_literal_uint()?)
    } else if eat(p, "STOP_ON_ERROR") {
        AlterPipeline::StopOnError(parse_on_off(p)?)
    } else {
        return p.expected(
            "OFFSETS, BATCH_INTERVAL, CONFIG, CREDENTIALS, MAX_RETRIES_PER_BATCH_PARTITION or STOP_ON_ERROR",
            p.peek_token(),
        );
    };
    Ok(Stmt::AlterPipeline { name, change })
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
    if let Some(stmt) = parse_pipeline_stmt(p)? {
        return Ok(Ok(stmt));
    }
    if eat(p, "ALTER") {
        if eat(p, "PIPELINE") {
            return parse_alter_pipeline(p).map(Ok);
        }
        if eat(p, "TABLE") {
            let table = p.parse_identifier()?.value;
            expect(p, "ADD")?;
            let _ = eat(p, "COLUMN");
            let name = p.parse_identifier()?.value;
            if eat(p, "AS") {
                let expr = p.parse_expr()?;
                expect(p, "PERSISTED")?;
                let data_type = p.parse_data_type()?;
                return Ok(Ok(Stmt::AddColumn {
                    table,
                    name,
                    data_type,
                    computed: Some(expr.to_string()),
                }));
            }
            let data_type = p.parse_data_type()?;
            let _ = eat(p, "NULL");
            return Ok(Ok(Stmt::AddColumn {
                table,
                name,
                data_type,
                computed: None,
            }));
        }
        return unsupported_or_error(sql);
    }
    if word_is(&p.peek_token().token, "ADD") {
        p.next_token();
        expect(p, "AGGREGATOR")?;
        let node = p.parse_literal_uint()?;
        let grpc_address = parse_host_port(p)?;
        return Ok(Ok(Stmt::AddAggregator { node, grpc_address }));
    }
    if eat(p, "REMOVE") {
        expect(p, "AGGREGATOR")?;
        let target = match p.peek_token().token {
            Token::Number(..) => AggregatorRef::Id(p.parse_literal_uint()?),
            _ => AggregatorRef::Address(parse_host_port(p)?),
        };
        return Ok(Ok(Stmt::RemoveAggregator { target }));
    }
    if eat(p, "REBALANCE") {
        expect(p, "PARTITIONS")?;
        let database = if p.parse_keyword(Keyword::ON) {
            Some(p.parse_identifier()?.value)
        } else {
            None
        };
        return Ok(Ok(Stmt::RebalancePartitions { database }));
    }
    if eat(p, "DESCRIBE") || eat(p, "DESC") {
        return Ok(Ok(Stmt::Describe {
            name: p.parse_identifier()?.value,
        }));
    }
    if p.parse_keyword(Keyword::CREATE) {
        let or_replace = p.parse_keywords(&[Keyword::OR, Keyword::REPLACE]);
        let inferred = eat(p, "INFERRED");
        if eat(p, "PIPELINE") {
            return parse_create_pipeline(p, or_replace, inferred).map(Ok);
        }
        if inferred || or_replace {
            return p.expected("PIPELINE", p.peek_token());
        }
        if eat(p, "INDEX") {
            let name = p.parse_identifier()?.value;
            expect(p, "ON")?;
            let table = p.parse_identifier()?.value;
            p.expect_token(&Token::LParen)?;
            let column = p.parse_identifier()?.value;
            p.expect_token(&Token::RParen)?;
            return Ok(Ok(Stmt::CreateIndex {
                name,
                table,
                column,
            }));
        }
        if word_is(&p.peek_token().token, "TABLE") {
            let parsed = Parser::parse_sql(&MySqlDialect {}, sql)?;
            // The whole text was parsed above: move our parser past it.
            while p.next_token().token != Token::EOF {}
            return match parsed.into_iter().next() {
                Some(Statement::CreateTable(ct)) => Ok(Ok(Stmt::CreateTable(Box::new(ct)))),
                _ => unsupported_or_error(sql),
            };
        }
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
        if eat(p, "PIPELINE") {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = p.parse_identifier()?.value;
            return Ok(Ok(Stmt::DropPipeline { name, if_exists }));
        }
        if eat(p, "TABLE") {
            let if_exists = p.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            let name = p.parse_identifier()?.value;
            return Ok(Ok(Stmt::DropTable { name, if_exists }));
        }
        if eat(p, "INDEX") {
            let name = p.parse_identifier()?.value;
            expect(p, "ON")?;
            let table = p.parse_identifier()?.value;
            return Ok(Ok(Stmt::DropIndex { name, table }));
        }
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
    if eat(p, "PIPELINES") {
        return Ok(Ok(Stmt::ShowPipelines));
    }
    if p.parse_keyword(Keyword::CREATE) {
        if eat(p, "PIPELINE") {
            let name = p.parse_identifier()?.value;
            let _ = eat(p, "EXTENDED");
            return Ok(Ok(Stmt::ShowCreatePipeline { name }));
        }
        if eat(p, "TABLE") {
            return Ok(Ok(Stmt::ShowCreateTable {
                name: p.parse_identifier()?.value,
            }));
        }
        return p.expected("PIPELINE or TABLE", p.peek_token());
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
        let e = parse("CREATE VIEW v AS SELECT 1").unwrap_err();
        assert_eq!(e.code, super::super::result::codes::NOT_SUPPORTED_YET);
        assert!(e.message.contains("CREATE VIEW"), "{}", e.message);
        assert!(matches!(
            parse("CREATE TABLE t (a INT)").unwrap(),
            Stmt::CreateTable(_)
        ));
        assert!(parse("SELECT 1 garbage garbage").is_err());
        assert!(matches!(
            parse("select @@version_comment limit 1").unwrap(),
            Stmt::Select(_)
        ));
    }

    #[test]
    fn pipeline_statements() {
        let sql = "CREATE INFERRED PIPELINE kinesis_pipeline \nAS LOAD DATA KAFKACONNECT 'kafka-connector'\nCONFIG '{\n  \"connector.class\": \"x\",\n  \"tasks.max\": 4\n}'\nCREDENTIALS '{}' -- AWS credentials are in CONFIG for Kinesis connector\nFORMAT AVRO;";
        let Stmt::CreatePipeline(c) = parse(sql).unwrap() else {
            panic!()
        };
        assert!(c.inferred && !c.or_replace);
        assert_eq!(c.name, "kinesis_pipeline");
        assert_eq!(c.source, "KAFKACONNECT");
        assert_eq!(c.connector, "kafka-connector");
        assert!(c.config.contains("\"tasks.max\": 4"));
        assert_eq!(c.credentials.as_deref(), Some("{}"));
        assert_eq!(c.format.as_deref(), Some("AVRO"));
        let Stmt::CreatePipeline(c) = parse("CREATE OR REPLACE PIPELINE p AS LOAD DATA KAFKACONNECT 'k' CONFIG '{}' BATCH_INTERVAL 100 MAX_RETRIES_PER_BATCH_PARTITION 2 STOP_ON_ERROR OFF INTO TABLE t FORMAT AVRO").unwrap() else { panic!() };
        assert!(c.or_replace && !c.inferred);
        assert_eq!(
            (
                c.batch_interval,
                c.max_retries,
                c.stop_on_error,
                c.table.as_deref()
            ),
            (Some(100), Some(2), Some(false), Some("t"))
        );
        assert_eq!(
            parse("START PIPELINE IF NOT RUNNING p FOREGROUND LIMIT 3 BATCHES").unwrap(),
            Stmt::StartPipeline {
                name: Some("p".into()),
                if_not_running: true,
                failed_only: false,
                foreground: Some(Some(3))
            }
        );
        assert_eq!(
            parse("STOP ALL PIPELINES").unwrap(),
            Stmt::StopPipeline {
                name: None,
                if_running: true
            }
        );
        assert_eq!(
            parse("STOP PIPELINE IF RUNNING p").unwrap(),
            Stmt::StopPipeline {
                name: Some("p".into()),
                if_running: true
            }
        );
        assert_eq!(
            parse("DROP PIPELINE IF EXISTS p").unwrap(),
            Stmt::DropPipeline {
                name: "p".into(),
                if_exists: true
            }
        );
        assert_eq!(
            parse("ALTER PIPELINE p SET OFFSETS EARLIEST").unwrap(),
            Stmt::AlterPipeline {
                name: "p".into(),
                change: AlterPipeline::OffsetsEarliest
            }
        );
        assert_eq!(
            parse("TEST PIPELINE p LIMIT 5").unwrap(),
            Stmt::TestPipeline {
                name: "p".into(),
                limit: Some(5)
            }
        );
        assert_eq!(parse("SHOW PIPELINES").unwrap(), Stmt::ShowPipelines);
        assert_eq!(
            parse("SHOW CREATE PIPELINE p EXTENDED").unwrap(),
            Stmt::ShowCreatePipeline { name: "p".into() }
        );
        assert_eq!(
            parse("CLEAR PIPELINE ERRORS").unwrap(),
            Stmt::ClearPipelineErrors
        );
        assert!(
            parse("CREATE PIPELINE p AS LOAD DATA KAFKACONNECT 'k' FORMAT AVRO").is_err(),
            "CONFIG is required"
        );
        assert!(parse("START PIPELINE").is_err());
    }
}

//! Pipeline and table statements.

use super::exec::{no_database, now_ms, Session, SqlEngine};
use super::parse::{AlterPipeline, CreatePipeline, Stmt};
use super::result::{codes, QueryOutput, SqlError, Value};
use crate::cluster::leaf_client;
use common::catalog::pipelines::{
    redacted_config, PipelineChange, PipelineDef, PipelineState, StartOverride,
};
use common::catalog::tables::{ColumnType, Table, TableColumn};
use common::catalog::{Command, KAFKA_CONNECT_FLAG};
use common::connect::{self, avro::canonical_json};
use serde_json::Value as Json;
use sqlparser::ast::{ColumnOption, DataType};
use std::time::{Duration, Instant};

/// Pipeline failures use MySQL's generic error code (clients only know MySQL's codes).
const PIPELINE_ERROR: u16 = codes::UNKNOWN;

fn bad_args(msg: impl Into<String>) -> SqlError {
    SqlError::new(codes::WRONG_ARGUMENTS, msg)
}

fn parse_object(what: &str, text: &str) -> Result<serde_json::Map<String, Json>, SqlError> {
    match serde_json::from_str::<Json>(text) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(_) => Err(bad_args(format!("{what} must be a JSON object"))),
        Err(e) => Err(bad_args(format!("{what} is not valid JSON: {e}"))),
    }
}

fn column_type(dt: &DataType) -> Result<ColumnType, SqlError> {
    let name = dt.to_string().to_ascii_uppercase();
    Ok(match dt {
        DataType::JSON => ColumnType::Json,
        DataType::BigInt(_) => ColumnType::BigInt,
        DataType::Int(_)
        | DataType::Integer(_)
        | DataType::TinyInt(_)
        | DataType::SmallInt(_)
        | DataType::MediumInt(_) => ColumnType::Int,
        DataType::Double(_) | DataType::DoublePrecision | DataType::Float(_) | DataType::Real => {
            ColumnType::Double
        }
        DataType::Varchar(len) | DataType::Char(len) => ColumnType::Varchar(
            len.as_ref()
                .and_then(|l| match l {
                    sqlparser::ast::CharacterLength::IntegerLength { length, .. } => {
                        u32::try_from(*length).ok()
                    }
                    sqlparser::ast::CharacterLength::Max => None,
                })
                .unwrap_or(255),
        ),
        DataType::Blob(_)
        | DataType::LongBlob
        | DataType::MediumBlob
        | DataType::TinyBlob
        | DataType::Binary(_)
        | DataType::Varbinary(_) => ColumnType::Blob,
        _ if name.starts_with("TEXT") || name.contains("TEXT") => ColumnType::Text,
        _ => return Err(SqlError::unsupported(format!("column type {dt}"))),
    })
}

impl SqlEngine {
    fn database(&self, session: &Session) -> Result<String, SqlError> {
        let db = session.database.clone().ok_or_else(no_database)?;
        self.check_database(&db)?;
        Ok(db)
    }

    fn require_feature(&self) -> Result<(), SqlError> {
        if self
            .raft()
            .read_catalog(|c| c.feature_enabled(KAFKA_CONNECT_FLAG))
        {
            Ok(())
        } else {
            Err(common::Error::FeatureDisabled.into())
        }
    }

    pub(super) async fn run_pipeline_stmt(
        &self,
        session: &mut Session,
        stmt: Stmt,
    ) -> Result<QueryOutput, SqlError> {
        match stmt {
            Stmt::CreatePipeline(c) => self.create_pipeline(session, *c).await,
            Stmt::StartPipeline {
                name: Some(name),
                if_not_running,
                foreground,
                ..
            } => {
                let db = self.database(session)?;
                let started = self
                    .start_pipeline(&db, &name, if_not_running || foreground.is_some())
                    .await?;
                match foreground {
                    None => Ok(QueryOutput::ok()),
                    Some(limit) => self.foreground(&db, &name, started, limit).await,
                }
            }
            Stmt::StartPipeline {
                name: None,
                failed_only,
                ..
            } => {
                let db = self.database(session)?;
                let names: Vec<String> = self.raft().read_catalog(|c| {
                    c.pipelines
                        .values()
                        .filter(|p| p.database == db)
                        .filter(|p| {
                            if failed_only {
                                p.state == PipelineState::Error
                            } else {
                                p.state != PipelineState::Running
                            }
                        })
                        .map(|p| p.name.clone())
                        .collect()
                });
                for name in names {
                    self.start_pipeline(&db, &name, true).await?;
                }
                Ok(QueryOutput::ok())
            }
            Stmt::StopPipeline { name, if_running } => {
                let db = self.database(session)?;
                let names = match name {
                    Some(n) => vec![n],
                    None => self.raft().read_catalog(|c| {
                        c.pipelines
                            .values()
                            .filter(|p| p.database == db && p.state == PipelineState::Running)
                            .map(|p| p.name.clone())
                            .collect()
                    }),
                };
                for name in names {
                    self.propose(Command::StopPipeline {
                        database: db.clone(),
                        name,
                        if_running,
                        now_ms: now_ms(),
                    })
                    .await?;
                }
                Ok(QueryOutput::ok())
            }
            Stmt::DropPipeline { name, if_exists } => {
                let db = self.database(session)?;
                self.propose(Command::DropPipeline {
                    database: db,
                    name,
                    if_exists,
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            Stmt::AlterPipeline { name, change } => {
                let db = self.database(session)?;
                let change = match change {
                    AlterPipeline::OffsetsEarliest => PipelineChange::Offsets {
                        start: Some(StartOverride::Earliest),
                        offsets: vec![],
                    },
                    AlterPipeline::OffsetsLatest => PipelineChange::Offsets {
                        start: Some(StartOverride::Latest),
                        offsets: vec![],
                    },
                    AlterPipeline::OffsetsJson(text) => PipelineChange::Offsets {
                        start: None,
                        offsets: parse_offsets(&text)?,
                    },
                    AlterPipeline::BatchInterval(ms) => PipelineChange::BatchInterval(ms),
                    AlterPipeline::Config(text) => {
                        let config = parse_object("CONFIG", &text)?;
                        connect::validate_config(&config).map_err(|e| bad_args(e.to_string()))?;
                        PipelineChange::Config(config)
                    }
                    AlterPipeline::Credentials(text) => {
                        parse_object("CREDENTIALS", &text)?;
                        PipelineChange::Credentials(text)
                    }
                    AlterPipeline::MaxRetries(n) => {
                        PipelineChange::MaxRetries(u32::try_from(n).map_err(|_| {
                            bad_args("MAX_RETRIES_PER_BATCH_PARTITION is too large")
                        })?)
                    }
                    AlterPipeline::StopOnError(b) => PipelineChange::StopOnError(b),
                };
                self.propose(Command::AlterPipeline {
                    database: db,
                    name,
                    change,
                    now_ms: now_ms(),
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            Stmt::TestPipeline { name, limit } => {
                let db = self.database(session)?;
                self.test_pipeline(&db, &name, limit.unwrap_or(10)).await
            }
            Stmt::ShowPipelines => {
                let db = self.database(session)?;
                let rows = self.raft().read_catalog(|c| {
                    c.pipelines
                        .values()
                        .filter(|p| p.database == db)
                        .map(|p| {
                            vec![
                                Value::Text(p.name.clone()),
                                Value::Text(p.state.as_str().into()),
                                Value::Text(
                                    if p.state == PipelineState::Running {
                                        "True"
                                    } else {
                                        "False"
                                    }
                                    .into(),
                                ),
                            ]
                        })
                        .collect()
                });
                Ok(QueryOutput::text_rows(
                    &[&format!("Pipelines_in_{db}"), "State", "Scheduled"],
                    rows,
                ))
            }
            Stmt::ShowCreatePipeline { name } => {
                let db = self.database(session)?;
                let sql = self.raft().read_catalog(|c| {
                    c.pipeline(&db, &name).map(|p| {
                        let config = canonical_json(&Json::Object(redacted_config(&p.config)));
                        let mut sql = format!(
                            "CREATE {}PIPELINE `{}`\nAS LOAD DATA KAFKACONNECT '{}'\nCONFIG '{}'\nCREDENTIALS '<CREDENTIALS REDACTED>'\n",
                            if p.inferred { "INFERRED " } else { "" },
                            p.name,
                            p.connector,
                            config.replace('\'', "\\'")
                        );
                        if let Some(ms) = p.batch_interval_ms {
                            sql.push_str(&format!("BATCH_INTERVAL {ms}\n"));
                        }
                        if let Some(n) = p.max_retries {
                            sql.push_str(&format!("MAX_RETRIES_PER_BATCH_PARTITION {n}\n"));
                        }
                        if let Some(b) = p.stop_on_error {
                            sql.push_str(&format!("STOP_ON_ERROR {}\n", if b { "ON" } else { "OFF" }));
                        }
                        sql.push_str(&format!("INTO TABLE `{}`\nFORMAT AVRO", p.table));
                        sql
                    })
                })?;
                Ok(QueryOutput::text_rows(
                    &["Pipeline", "Create Pipeline"],
                    vec![vec![Value::Text(name), Value::Text(sql)]],
                ))
            }
            Stmt::ClearPipelineErrors => {
                let db = self.database(session)?;
                self.propose(Command::ClearPipelineErrors {
                    database: db,
                    name: None,
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            Stmt::ShowCreateTable { name } => {
                let db = self.database(session)?;
                let sql = self
                    .raft()
                    .read_catalog(|c| c.table(&db, &name).map(Table::create_sql))
                    .ok_or_else(|| {
                        SqlError::new(1146, format!("Table '{db}.{name}' doesn't exist"))
                    })?;
                Ok(QueryOutput::text_rows(
                    &["Table", "Create Table"],
                    vec![vec![Value::Text(name), Value::Text(sql)]],
                ))
            }
            Stmt::Describe { name } => {
                let db = self.database(session)?;
                let table = self
                    .raft()
                    .read_catalog(|c| c.table(&db, &name).cloned())
                    .ok_or_else(|| {
                        SqlError::new(1146, format!("Table '{db}.{name}' doesn't exist"))
                    })?;
                let rows = table
                    .columns
                    .iter()
                    .map(|c| {
                        vec![
                            Value::Text(c.name.clone()),
                            Value::Text(c.ty.to_string()),
                            Value::Text(if c.nullable { "YES" } else { "NO" }.into()),
                            Value::Text(String::new()),
                            Value::Null,
                            Value::Text(if c.computed.is_some() { "computed" } else { "" }.into()),
                        ]
                    })
                    .collect();
                Ok(QueryOutput::text_rows(
                    &["Field", "Type", "Null", "Key", "Default", "Extra"],
                    rows,
                ))
            }
            Stmt::CreateTable(ct) => {
                let db = self.database(session)?;
                let name = ct
                    .name
                    .0
                    .last()
                    .map(|p| p.to_string().trim_matches('`').to_string())
                    .unwrap_or_default();
                let mut columns = Vec::new();
                for c in &ct.columns {
                    let not_null = c
                        .options
                        .iter()
                        .any(|o| matches!(o.option, ColumnOption::NotNull));
                    columns.push(TableColumn {
                        name: c.name.value.clone(),
                        ty: column_type(&c.data_type)?,
                        nullable: !not_null,
                        computed: None,
                    });
                }
                if columns.is_empty() {
                    return Err(SqlError::parse("a table needs at least one column"));
                }
                self.propose(Command::CreateTable {
                    table: Table {
                        id: 0, // assigned by the catalog
                        database: db,
                        name,
                        columns,
                        created_ms: now_ms(),
                        indexes: vec![],
                    },
                    if_not_exists: ct.if_not_exists,
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            Stmt::AddColumn {
                table,
                name,
                data_type,
                computed,
            } => {
                let db = self.database(session)?;
                let existing = self
                    .raft()
                    .read_catalog(|c| c.table(&db, &table).cloned())
                    .ok_or_else(|| {
                        SqlError::new(1146, format!("Table '{db}.{table}' doesn't exist"))
                    })?;
                if let Some(sql) = &computed {
                    common::expr::compile(sql, &existing.columns).map_err(bad_args)?;
                }
                let column = TableColumn {
                    name,
                    ty: column_type(&data_type)?,
                    nullable: true,
                    computed,
                };
                self.propose(Command::AddColumn {
                    database: db.clone(),
                    table: table.clone(),
                    column,
                })
                .await?;
                self.backfill(&db, &table).await;
                Ok(QueryOutput::ok())
            }
            Stmt::CreateIndex {
                name,
                table,
                column,
            } => {
                let db = self.database(session)?;
                self.propose(Command::CreateIndex {
                    database: db.clone(),
                    table: table.clone(),
                    index: common::catalog::tables::Index {
                        name: name.clone(),
                        column,
                    },
                })
                .await?;
                if let Err(e) = self.build_index(&db, &table, &name, None).await {
                    // Not usable everywhere: take it back rather than answer from half an index.
                    let _ = self
                        .propose(Command::DropIndex {
                            database: db,
                            table,
                            name,
                        })
                        .await;
                    return Err(e);
                }
                Ok(QueryOutput::ok())
            }
            Stmt::RebalancePartitions { database } => {
                let db = database
                    .or_else(|| session.database.clone())
                    .ok_or_else(no_database)?;
                let holders = |c: &common::catalog::Catalog| -> Vec<common::ids::LeafId> {
                    c.databases.get(&db).map(|d| d.leaves()).unwrap_or_default()
                };
                let before = self.raft().read_catalog(holders);
                self.propose(Command::RebalancePartitions { name: db.clone() })
                    .await?;
                let (after, indexes) = self.raft().read_catalog(|c| {
                    let indexes: Vec<(String, String)> = c
                        .databases
                        .get(&db)
                        .map(|d| {
                            d.tables
                                .iter()
                                .flat_map(|(t, table)| {
                                    table.indexes.iter().map(|i| (t.clone(), i.name.clone()))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (holders(c), indexes)
                });
                let added: Vec<_> = after.into_iter().filter(|l| !before.contains(l)).collect();
                // The new leaves maintain the table's indexes from their first row on.
                for (table, index) in indexes {
                    self.build_index(&db, &table, &index, Some(&added)).await?;
                }
                Ok(QueryOutput::Ok {
                    affected_rows: added.len() as u64,
                })
            }
            Stmt::DropIndex { name, table } => {
                let db = self.database(session)?;
                self.propose(Command::DropIndex {
                    database: db.clone(),
                    table: table.clone(),
                    name: name.clone(),
                })
                .await?;
                let (leaves, table_id) = self.raft().read_catalog(|c| {
                    (
                        leaf_client::online_leaves(c, Some(&db)),
                        c.table(&db, &table).map_or(0, |t| t.id),
                    )
                });
                for addr in leaves {
                    if let Ok(mut c) = leaf_client::client(&addr, Duration::from_secs(60)) {
                        let _ = c
                            .drop_index(proto::DropIndexRequest {
                                database: db.clone(),
                                table: table.clone(),
                                index: name.clone(),
                                table_id,
                            })
                            .await;
                    }
                }
                Ok(QueryOutput::ok())
            }
            Stmt::DropTable { name, if_exists } => {
                let db = self.database(session)?;
                self.propose(Command::DropTable {
                    database: db,
                    name,
                    if_exists,
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            other => Err(SqlError::unsupported(format!("{other:?}"))),
        }
    }

    /// Builds an index on every leaf holding the table (or only on `only`); all must succeed.
    async fn build_index(
        &self,
        db: &str,
        table: &str,
        index: &str,
        only: Option<&[common::ids::LeafId]>,
    ) -> Result<(), SqlError> {
        let (holders, offline, columns, position, table_id) = self.raft().read_catalog(|c| {
            let holders: Vec<_> = c
                .databases
                .get(db)
                .map(|d| {
                    d.leaves()
                        .into_iter()
                        .filter(|id| only.is_none_or(|o| o.contains(id)))
                        .filter_map(|id| c.leaves.get(&id))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let t = c.table(db, table);
            let column = t
                .and_then(|t| t.indexes.iter().find(|i| i.name == index))
                .map(|i| i.column.clone());
            let position = t.zip(column).and_then(|(t, col)| {
                t.columns
                    .iter()
                    .position(|c| c.name.eq_ignore_ascii_case(&col))
            });
            let offline: Vec<String> = holders
                .iter()
                .filter(|l: &&common::catalog::Leaf| !l.online)
                .map(|l| l.address.clone())
                .collect();
            (
                holders,
                offline,
                t.map(|t| query::columns::to_proto(&t.columns))
                    .unwrap_or_default(),
                position,
                t.map_or(0, |t| t.id),
            )
        });
        if !offline.is_empty() {
            return Err(SqlError::new(
                codes::UNKNOWN,
                format!("cannot build index '{index}': leaves {offline:?} are offline"),
            ));
        }
        let position =
            position.ok_or_else(|| SqlError::new(codes::UNKNOWN, "index column not found"))?;
        for leaf in holders {
            let mut c = leaf_client::client(&leaf.address, Duration::from_secs(600))
                .map_err(|e| SqlError::new(codes::UNKNOWN, e))?;
            c.build_index(proto::BuildIndexRequest {
                database: db.into(),
                table: table.into(),
                index: index.into(),
                position: position as u32,
                columns: columns.clone(),
                table_id,
            })
            .await
            .map_err(|s| {
                SqlError::new(
                    codes::UNKNOWN,
                    format!(
                        "building index '{index}' on leaf {} failed: {}",
                        leaf.address,
                        s.message()
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// Asks every leaf holding the table to compute and store its new columns. Best effort:
    /// a leaf that misses it fills them when its rows are scanned.
    async fn backfill(&self, db: &str, table: &str) {
        let (leaves, columns, table_id) = self.raft().read_catalog(|c| {
            let t = c.table(db, table);
            (
                leaf_client::online_leaves(c, Some(db)),
                t.map(|t| query::columns::to_proto(&t.columns))
                    .unwrap_or_default(),
                t.map_or(0, |t| t.id),
            )
        });
        let calls = leaves.iter().map(|addr| {
            let req = proto::BackfillRequest {
                database: db.into(),
                table: table.into(),
                columns: columns.clone(),
                table_id,
            };
            async move {
                match leaf_client::client(addr, Duration::from_secs(300)) {
                    Ok(mut c) => {
                        if let Err(s) = c.backfill(req).await {
                            tracing::warn!(leaf = %addr, "backfill failed (rows are filled at scan time): {}", s.message());
                        }
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        });
        futures::future::join_all(calls).await;
    }

    async fn create_pipeline(
        &self,
        session: &Session,
        c: CreatePipeline,
    ) -> Result<QueryOutput, SqlError> {
        let db = self.database(session)?;
        self.require_feature()?;
        if c.source != "KAFKACONNECT" {
            return Err(SqlError::unsupported(format!(
                "LOAD DATA {} (only KAFKACONNECT pipelines exist here)",
                c.source
            )));
        }
        match c.format.as_deref() {
            Some("AVRO") => {}
            Some(other) => {
                return Err(bad_args(format!(
                    "FORMAT {other} is not valid for KAFKACONNECT pipelines; use FORMAT AVRO"
                )))
            }
            None => return Err(bad_args("KAFKACONNECT pipelines need FORMAT AVRO")),
        }
        let config = parse_object("CONFIG", &c.config)?;
        let credentials = c.credentials.clone().unwrap_or_else(|| "{}".into());
        parse_object("CREDENTIALS", &credentials)?;
        let effective = connect::effective_config(&config, &credentials)
            .map_err(|e| bad_args(e.to_string()))?;
        connect::validate_config(&effective)
            .map_err(|e| bad_args(format!("invalid CONFIG: {e}")))?;
        let table = match (&c.table, c.inferred) {
            (Some(t), _) => t.clone(),
            (None, true) => c.name.clone(),
            (None, false) => {
                return Err(bad_args(
                    "CREATE PIPELINE needs INTO TABLE <table> (or CREATE INFERRED PIPELINE)",
                ))
            }
        };
        let def = PipelineDef {
            database: db,
            name: c.name,
            connector: c.connector,
            config,
            credentials,
            table,
            inferred: c.inferred,
            batch_interval_ms: c.batch_interval,
            max_retries: c.max_retries.map(|n| n.min(u64::from(u32::MAX)) as u32),
            stop_on_error: c.stop_on_error,
        };
        self.propose(Command::CreatePipeline {
            def,
            or_replace: c.or_replace,
            if_not_exists: c.if_not_exists,
            now_ms: now_ms(),
        })
        .await?;
        Ok(QueryOutput::ok())
    }

    /// Plans the tasks on a leaf (the connector may ask its source) and starts the pipeline.
    /// Returns where the run starts: its first BATCH_ID and the rows loaded before it.
    async fn start_pipeline(
        &self,
        db: &str,
        name: &str,
        if_not_running: bool,
    ) -> Result<RunStart, SqlError> {
        let start = |p: &common::catalog::pipelines::Pipeline| RunStart {
            batch_id: p.next_batch_id,
            rows: p.rows_loaded,
        };
        self.require_feature()?;
        let (pipeline, leaves) = self.raft().read_catalog(|c| {
            c.pipeline(db, name)
                .map(|p| (p.clone(), leaf_client::online_leaves(c, Some(db))))
        })?;
        if pipeline.state == PipelineState::Running {
            if if_not_running {
                return Ok(start(&pipeline));
            }
            return Err(common::Error::PipelineRunning { name: name.into() }.into());
        }
        let config = connect::effective_config(&pipeline.config, &pipeline.credentials)
            .map_err(|e| bad_args(e.to_string()))?;
        let max_tasks = connect::tasks_max(&config).map_err(|e| bad_args(e.to_string()))?;
        let tasks = self.plan_on_leaf(&leaves, &config, max_tasks, name).await?;
        self.propose(Command::StartPipeline {
            database: db.into(),
            name: name.into(),
            tasks,
            if_not_running,
            now_ms: now_ms(),
        })
        .await?;
        Ok(start(&pipeline))
    }

    async fn plan_on_leaf(
        &self,
        leaves: &[String],
        config: &serde_json::Map<String, Json>,
        max_tasks: usize,
        name: &str,
    ) -> Result<Vec<std::collections::BTreeMap<String, String>>, SqlError> {
        if leaves.is_empty() {
            return Err(SqlError::new(
                PIPELINE_ERROR,
                format!("Cannot start pipeline '{name}': no leaf is online"),
            ));
        }
        let req = proto::PlanTasksRequest {
            config_json: Json::Object(config.clone()).to_string(),
            max_tasks: max_tasks as u32,
        };
        let mut last = String::new();
        for addr in leaves {
            let mut client = leaf_client::client(addr, Duration::from_secs(30))
                .map_err(|e| SqlError::new(codes::UNKNOWN, e))?;
            match client.plan_tasks(req.clone()).await {
                Ok(r) => {
                    return r
                        .into_inner()
                        .task_configs_json
                        .iter()
                        .map(|t| {
                            serde_json::from_str(t).map_err(|e| {
                                SqlError::new(
                                    codes::UNKNOWN,
                                    format!("bad task config from leaf: {e}"),
                                )
                            })
                        })
                        .collect();
                }
                Err(s)
                    if s.code() == tonic::Code::InvalidArgument
                        || s.code() == tonic::Code::Unavailable
                            && !s.message().contains("transport")
                            && !s.message().contains("connect") =>
                {
                    return Err(SqlError::new(
                        PIPELINE_ERROR,
                        format!(
                            "Cannot start pipeline '{name}': LEAF ERROR ({addr}): {}",
                            s.message()
                        ),
                    ));
                }
                Err(s) => last = format!("leaf {addr}: {}", s.message()),
            }
        }
        Err(SqlError::new(
            PIPELINE_ERROR,
            format!("Cannot start pipeline '{name}': no leaf could plan its tasks ({last})"),
        ))
    }

    /// START PIPELINE ... FOREGROUND: waits for batches, then stops the pipeline. Returns the
    /// rows loaded.
    async fn foreground(
        &self,
        db: &str,
        name: &str,
        run: RunStart,
        limit: Option<u64>,
    ) -> Result<QueryOutput, SqlError> {
        let from_batch = run.batch_id;
        // Idle: no batch for a max batch interval plus 3 s, and longer than a dead leaf can
        // go unnoticed (its tasks move only after the heartbeat timeout).
        let idle_after = Duration::from_millis(
            u64::from(
                self.raft()
                    .read_catalog(|c| c.variable_u32("pipelines_extractor_max_batch_interval_ms")),
            ) + 3000,
        )
        .max(self.leaf_heartbeat_timeout + Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut last_progress = Instant::now();
        let mut seen = 0usize;
        let outcome = loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (state, batches, rows, error, moving, all_ended) =
                self.raft().read_catalog(|c| {
                    c.pipeline(db, name).map(|p| {
                        // Counted from the totals, not the bounded batch history: a run may
                        // have more batches than pipelines_batches_metadata_to_keep.
                        let batches = p.next_batch_id.saturating_sub(from_batch) as usize;
                        let rows = p.rows_loaded.saturating_sub(run.rows);
                        // A task without a live leaf (lost, being moved) is not idle: wait for it.
                        let moving = p.tasks.iter().any(|t| {
                            t.epoch == 0
                                || !t
                                    .leaf
                                    .and_then(|l| c.leaves.get(&l))
                                    .is_some_and(|l| l.online)
                        });
                        // Every task's source partitions ended during this run (a bounded
                        // source read to its end): nothing more will come. An end recorded by
                        // an earlier run does not count: ALTER PIPELINE may have moved it on.
                        let all_ended = !p.tasks.is_empty()
                            && p.tasks.iter().all(|t| {
                                let mut mine = p
                                    .offsets
                                    .values()
                                    .filter(|o| o.task_id == t.task_id)
                                    .peekable();
                                mine.peek().is_some()
                                    && mine.all(|o| o.finished && o.batch_id >= from_batch)
                            });
                        (
                            p.state,
                            batches,
                            rows,
                            p.errors.back().map(|e| e.message.clone()),
                            moving,
                            all_ended,
                        )
                    })
                })?;
            if batches > seen || moving {
                seen = batches;
                last_progress = Instant::now();
            }
            if state == PipelineState::Error {
                break Err(SqlError::new(
                    PIPELINE_ERROR,
                    error.unwrap_or_else(|| "the pipeline failed".into()),
                ));
            }
            if state != PipelineState::Running {
                break Ok(rows);
            }
            if limit.is_some_and(|l| batches as u64 >= l)
                || all_ended
                || last_progress.elapsed() > idle_after
                || Instant::now() > deadline
            {
                break Ok(rows);
            }
        };
        let _ = self
            .propose(Command::StopPipeline {
                database: db.into(),
                name: name.into(),
                if_running: true,
                now_ms: now_ms(),
            })
            .await;
        if outcome.is_ok() {
            self.wait_for_finalized(db).await;
        }
        outcome.map(|rows| QueryOutput::Ok {
            affected_rows: rows,
        })
    }

    /// Waits (up to 10 s) until no online leaf holding `db` has a batch left prepared: a
    /// committed batch's rows become visible when its leaf finalizes it, just after the master
    /// commits, so FOREGROUND returns only once what it counted can be read.
    async fn wait_for_finalized(&self, db: &str) {
        let leaves = self.raft().read_catalog(|c| {
            c.databases
                .get(db)
                .map(|d| d.leaves())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|id| c.leaves.get(&id))
                .filter(|l| l.online)
                .map(|l| l.address.clone())
                .collect::<Vec<_>>()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        for address in leaves {
            let Ok(mut client) = leaf_client::client(&address, Duration::from_secs(2)) else {
                continue;
            };
            while Instant::now() < deadline {
                match client.status(proto::StatusRequest {}).await {
                    Ok(s) if s.get_ref().prepared_batches > 0 => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => break,
                }
            }
        }
    }

    async fn test_pipeline(
        &self,
        db: &str,
        name: &str,
        limit: u64,
    ) -> Result<QueryOutput, SqlError> {
        let (pipeline, leaves) = self.raft().read_catalog(|c| {
            c.pipeline(db, name)
                .map(|p| (p.clone(), leaf_client::online_leaves(c, Some(db))))
        })?;
        if pipeline.state == PipelineState::Running {
            return Err(SqlError::new(
                PIPELINE_ERROR,
                format!("Pipeline '{name}' is running; stop it before TEST PIPELINE"),
            ));
        }
        let config = connect::effective_config(&pipeline.config, &pipeline.credentials)
            .map_err(|e| bad_args(e.to_string()))?;
        let offsets = pipeline
            .offsets
            .iter()
            .map(|(k, o)| proto::SourceOffset {
                key: k.clone(),
                value_json: o.value.to_string(),
                finished: o.finished,
            })
            .collect();
        let addr = leaves
            .first()
            .ok_or_else(|| SqlError::new(PIPELINE_ERROR, "no leaf is online"))?;
        let mut client = leaf_client::client(addr, Duration::from_secs(30))
            .map_err(|e| SqlError::new(codes::UNKNOWN, e))?;
        let rows = client
            .test_pipeline(proto::TestPipelineRequest {
                config_json: Json::Object(config).to_string(),
                offsets,
                limit: limit.min(10_000) as u32,
            })
            .await
            .map_err(|s| {
                SqlError::new(
                    PIPELINE_ERROR,
                    format!("LEAF ERROR ({addr}): {}", s.message()),
                )
            })?
            .into_inner()
            .rows_json;
        let rows = rows
            .iter()
            .filter_map(|r| serde_json::from_str::<Vec<String>>(r).ok())
            .map(|r| r.into_iter().map(Value::Text).collect())
            .collect();
        Ok(QueryOutput::Rows {
            columns: vec![
                super::result::Column::text("topic"),
                super::result::Column {
                    name: "id".into(),
                    kind: super::result::ColumnKind::Json,
                },
                super::result::Column {
                    name: "record".into(),
                    kind: super::result::ColumnKind::Json,
                },
            ],
            rows,
        })
    }
}

/// `SET OFFSETS '<json>'`: `{"<KEY json>": <VALUE>, ...}` or `[{"KEY":..,"VALUE":..}, ...]`.
fn parse_offsets(text: &str) -> Result<Vec<(String, Json)>, SqlError> {
    let v: Json = serde_json::from_str(text)
        .map_err(|e| bad_args(format!("OFFSETS is not valid JSON: {e}")))?;
    let mut out = Vec::new();
    match v {
        Json::Object(m) => {
            for (k, value) in m {
                let key: Json = serde_json::from_str(&k).map_err(|_| {
                    bad_args(format!(
                        "offset key '{k}' is not JSON (expected e.g. {{\"shardId\":\"...\"}})"
                    ))
                })?;
                out.push((canonical_json(&key), value));
            }
        }
        Json::Array(items) => {
            for item in items {
                let (Some(k), Some(v)) = (item.get("KEY"), item.get("VALUE")) else {
                    return Err(bad_args("each offset needs KEY and VALUE"));
                };
                out.push((canonical_json(k), v.clone()));
            }
        }
        _ => return Err(bad_args("OFFSETS must be a JSON object or array")),
    }
    Ok(out)
}

/// Where a pipeline run starts: its first BATCH_ID and the rows loaded before it.
#[derive(Debug, Clone, Copy)]
struct RunStart {
    batch_id: u64,
    rows: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_forms() {
        let a = parse_offsets(r#"{"{\"shardId\":\"s0\"}": {"sequenceNumber": "5"}}"#).unwrap();
        let b = parse_offsets(r#"[{"KEY": {"shardId": "s0"}, "VALUE": {"sequenceNumber": "5"}}]"#)
            .unwrap();
        assert_eq!(a, b);
        assert!(parse_offsets("[1]").is_err());
        assert!(parse_offsets("nope").is_err());
    }
}

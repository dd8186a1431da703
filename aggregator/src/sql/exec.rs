//! Statement execution for one MySQL session.

use super::eval::{eval, EvalContext};
use super::parse::{parse, AggregatorRef, Assignment, Scope, Stmt};
use super::result::{codes, Column, ColumnKind, QueryOutput, SqlError, Value};
use crate::cluster::{probe_aggregator, Probe};
use crate::raft::RaftHandle;
use common::catalog::{Command, RESERVED_DATABASES};
use common::ids::NodeId;
use common::variables::{self, like_match, Access};
use sqlparser::ast::{Expr, SelectItem, SetExpr};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Per-connection state.
#[derive(Debug, Default)]
pub struct Session {
    pub connection_id: u32,
    pub user: String,
    pub database: Option<String>,
    /// Session values of system variables (normalised).
    pub variables: HashMap<String, String>,
    /// `@name` user variables.
    pub user_variables: HashMap<String, Value>,
}

/// Runs statements against the cluster. One per aggregator, shared by all sessions.
pub struct SqlEngine {
    raft: RaftHandle,
    /// Open MySQL connections on this aggregator.
    pub connections: Arc<AtomicUsize>,
    /// The MySQL address this aggregator serves at.
    mysql_address: String,
    /// How long a silent leaf stays online (`--leaf-heartbeat-timeout-ms`): START PIPELINE
    /// ... FOREGROUND does not call a pipeline idle before a dead leaf's tasks could move.
    pub(super) leaf_heartbeat_timeout: std::time::Duration,
    /// What SELECTs plan against, kept until the catalog's tables change.
    query_envs: super::env::QueryEnvs,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn split_host_port(addr: &str) -> (String, Value) {
    match addr.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().map_or(Value::Null, Value::Int)),
        None => (addr.to_string(), Value::Null),
    }
}

struct Ctx<'a> {
    engine: &'a SqlEngine,
    session: &'a Session,
}

impl EvalContext for Ctx<'_> {
    fn system_variable(&self, scope: Option<Scope>, name: &str) -> Result<Value, SqlError> {
        let value = self.engine.variable_value(self.session, scope, name)?;
        let def = variables::lookup(name)?;
        Ok(match def.kind {
            variables::Kind::Int { .. } => value.parse().map_or(Value::Text(value), Value::Int),
            variables::Kind::Bool => Value::Int(i64::from(value == "ON")),
            _ => Value::Text(value),
        })
    }

    fn user_variable(&self, name: &str) -> Value {
        self.session
            .user_variables
            .get(&name.to_ascii_lowercase())
            .cloned()
            .unwrap_or(Value::Null)
    }

    fn database(&self) -> Option<String> {
        self.session.database.clone()
    }

    fn user(&self) -> String {
        format!("{}@%", self.session.user)
    }

    fn connection_id(&self) -> u32 {
        self.session.connection_id
    }
}

/// Whether a statement reads the catalog or the leaves (and so needs a current view of the
/// cluster, [`crate::raft::RaftHandle::read_barrier`]). Session statements, constant SELECTs
/// (a pool's `SELECT 1`) and `SHOW AGGREGATORS` (this aggregator's own view of the group, for
/// diagnosing it) answer without the master.
fn reads_cluster_state(stmt: &Stmt) -> bool {
    match stmt {
        Stmt::Set(_)
        | Stmt::SetNames
        | Stmt::Transaction
        | Stmt::Use { .. }
        | Stmt::ShowVariables { .. }
        | Stmt::ShowWarnings
        | Stmt::ShowAggregators => false,
        Stmt::Select(query) => {
            matches!(query.body.as_ref(), SetExpr::Select(s) if !s.from.is_empty())
                || !matches!(query.body.as_ref(), SetExpr::Select(_))
        }
        _ => true,
    }
}

impl SqlEngine {
    pub fn new(
        raft: RaftHandle,
        mysql_address: String,
        leaf_heartbeat_timeout: std::time::Duration,
    ) -> Self {
        Self {
            raft,
            connections: Arc::new(AtomicUsize::new(0)),
            mysql_address,
            leaf_heartbeat_timeout,
            query_envs: Default::default(),
        }
    }

    pub(super) fn query_envs(&self) -> &super::env::QueryEnvs {
        &self.query_envs
    }

    /// SELECTs whose plan was bound from a kept plan, and SELECTs planned in full.
    pub fn plan_counts(&self) -> (u64, u64, u64) {
        self.query_envs.plan_counts()
    }

    pub fn raft(&self) -> &RaftHandle {
        &self.raft
    }

    /// Parses and runs one statement.
    pub async fn execute(&self, session: &mut Session, sql: &str) -> Result<QueryOutput, SqlError> {
        let stmt = parse(sql)?;
        self.run(session, stmt).await
    }

    async fn run(&self, session: &mut Session, stmt: Stmt) -> Result<QueryOutput, SqlError> {
        if reads_cluster_state(&stmt) {
            // Answer from the cluster as it is, not from a view this aggregator may have been
            // left with (cut off from the master, or a master that lost its quorum).
            self.raft.read_barrier().await?;
        }
        match stmt {
            Stmt::CreateDatabase {
                name,
                if_not_exists,
                partitions,
            } => {
                self.propose(Command::CreateDatabase {
                    name,
                    partitions,
                    if_not_exists,
                    now_ms: now_ms(),
                })
                .await?;
                Ok(QueryOutput::Ok { affected_rows: 1 })
            }
            Stmt::DropDatabase { name, if_exists } => {
                if RESERVED_DATABASES.contains(&name.to_ascii_lowercase().as_str()) {
                    return Err(SqlError::new(
                        codes::ACCESS_DENIED,
                        format!("Access denied for user 'root'@'%' to database '{name}'"),
                    ));
                }
                self.propose(Command::DropDatabase {
                    name: name.clone(),
                    if_exists,
                })
                .await?;
                if session.database.as_deref() == Some(&name) {
                    session.database = None;
                }
                Ok(QueryOutput::ok())
            }
            Stmt::Use { database } => {
                self.use_database(session, &database)?;
                Ok(QueryOutput::ok())
            }
            Stmt::Set(assignments) => {
                for a in assignments {
                    self.set(session, a).await?;
                }
                Ok(QueryOutput::ok())
            }
            Stmt::SetNames | Stmt::Transaction => Ok(QueryOutput::ok()),
            Stmt::AddAggregator { node, grpc_address } => {
                if node == 0 {
                    return Err(SqlError::new(
                        codes::WRONG_ARGUMENTS,
                        "aggregator id 0 is reserved; ids are positive integers",
                    ));
                }
                crate::config::check_host_port(&grpc_address).map_err(|e| {
                    SqlError::new(
                        codes::WRONG_ARGUMENTS,
                        format!("aggregator address '{grpc_address}': {e}"),
                    )
                })?;
                self.propose(Command::AddMember {
                    node: NodeId(node),
                    grpc_address,
                })
                .await?;
                Ok(QueryOutput::ok())
            }
            Stmt::RemoveAggregator { target } => {
                let node = self.resolve_aggregator(&target)?;
                self.propose(Command::RemoveMember { node }).await?;
                Ok(QueryOutput::ok())
            }
            Stmt::ShowDatabases { like } => {
                let mut names: Vec<String> =
                    RESERVED_DATABASES.iter().map(|s| s.to_string()).collect();
                names.extend(
                    self.raft
                        .read_catalog(|c| c.databases.keys().cloned().collect::<Vec<_>>()),
                );
                let rows = names
                    .into_iter()
                    .filter(|n| like.as_deref().is_none_or(|p| like_match(p, n)))
                    .map(|n| vec![Value::Text(n)])
                    .collect();
                Ok(QueryOutput::text_rows(&["Database"], rows))
            }
            Stmt::ShowTables { like } => {
                let db = session.database.clone().ok_or_else(no_database)?;
                self.check_database(&db)?;
                let names: Vec<String> = self.raft.read_catalog(|c| {
                    c.databases
                        .get(&db)
                        .map(|d| d.tables.keys().cloned().collect())
                        .unwrap_or_default()
                });
                let rows = names
                    .into_iter()
                    .filter(|n| like.as_deref().is_none_or(|p| like_match(p, n)))
                    .map(|n| vec![Value::Text(n)])
                    .collect();
                Ok(QueryOutput::text_rows(&[&format!("Tables_in_{db}")], rows))
            }
            Stmt::ShowVariables { scope, like } => {
                let mut rows = Vec::new();
                for def in variables::VARIABLES {
                    if like.as_deref().is_some_and(|p| !like_match(p, def.name)) {
                        continue;
                    }
                    let value = self.variable_value(session, Some(scope), def.name)?;
                    rows.push(vec![Value::Text(def.name.into()), Value::Text(value)]);
                }
                Ok(QueryOutput::text_rows(&["Variable_name", "Value"], rows))
            }
            Stmt::ShowLeaves => Ok(self.show_leaves()),
            Stmt::ShowAggregators => Ok(self.show_aggregators().await),
            Stmt::ShowPartitions { database } => {
                let db = database
                    .or_else(|| session.database.clone())
                    .ok_or_else(no_database)?;
                self.show_partitions(&db)
            }
            Stmt::ShowWarnings => Ok(QueryOutput::text_rows(
                &["Level", "Code", "Message"],
                vec![],
            )),
            Stmt::Select(query) => {
                let has_from =
                    matches!(query.body.as_ref(), SetExpr::Select(s) if !s.from.is_empty());
                if !has_from {
                    match self.select_constant(session, &query) {
                        Err(e) if e.code == codes::NOT_SUPPORTED_YET || e.code == 1305 => {}
                        other => return other,
                    }
                }
                let vars = self.variable_snapshot(session);
                super::query::run(self, session, &query, vars).await
            }
            other => self.run_pipeline_stmt(session, other).await,
        }
    }

    pub(super) async fn propose(
        &self,
        command: Command,
    ) -> Result<common::catalog::Output, SqlError> {
        Ok(self.raft.propose(command).await?)
    }

    pub(super) fn check_database(&self, name: &str) -> Result<(), SqlError> {
        let known = RESERVED_DATABASES.contains(&name.to_ascii_lowercase().as_str())
            || self.raft.read_catalog(|c| c.databases.contains_key(name));
        if known {
            Ok(())
        } else {
            Err(SqlError::new(
                codes::BAD_DB,
                format!("Unknown database '{name}'"),
            ))
        }
    }

    /// `USE db` and COM_INIT_DB.
    pub fn use_database(&self, session: &mut Session, name: &str) -> Result<(), SqlError> {
        let name = name.trim().trim_matches('`');
        self.check_database(name)?;
        session.database = Some(name.to_string());
        Ok(())
    }

    /// A system variable's value as seen by `session` (`scope` None: session, then global).
    fn variable_value(
        &self,
        session: &Session,
        scope: Option<Scope>,
        name: &str,
    ) -> Result<String, SqlError> {
        let def = variables::lookup(name)?;
        if scope != Some(Scope::Global) {
            if let Some(v) = session.variables.get(def.name) {
                return Ok(v.clone());
            }
        }
        Ok(self
            .raft
            .read_catalog(|c| c.variable(def.name))
            .unwrap_or_else(|| def.default.to_string()))
    }

    async fn set(&self, session: &mut Session, a: Assignment) -> Result<(), SqlError> {
        if let Some(user) = a.name.strip_prefix('@') {
            let v = eval(
                &a.value,
                &Ctx {
                    engine: self,
                    session,
                },
            )?;
            session.user_variables.insert(user.to_ascii_lowercase(), v);
            return Ok(());
        }
        let def = variables::lookup(&a.name)?;
        if def.access == Access::ReadOnly {
            return Err(common::Error::ReadOnlyVariable {
                name: def.name.into(),
            }
            .into());
        }
        // Bare words (ON, OFF, DEFAULT, STRICT_ALL_TABLES) are values, not columns.
        let raw = match &a.value {
            Expr::Identifier(id) if !id.value.starts_with('@') => {
                if id.value.eq_ignore_ascii_case("DEFAULT") {
                    def.default.to_string()
                } else {
                    id.value.clone()
                }
            }
            other => eval(
                other,
                &Ctx {
                    engine: self,
                    session,
                },
            )?
            .to_text()
            .ok_or_else(|| {
                SqlError::new(
                    codes::WRONG_VALUE_FOR_VAR,
                    format!(
                        "Variable '{}' can't be set to the value of 'NULL'",
                        def.name
                    ),
                )
            })?,
        };
        let value = def.normalize(&raw)?;
        match a.scope {
            Scope::Global => {
                self.propose(Command::SetVariable {
                    name: def.name.to_string(),
                    value,
                })
                .await?;
            }
            Scope::Session => {
                if def.access == Access::Global {
                    return Err(SqlError::new(
                        codes::GLOBAL_VARIABLE,
                        format!(
                            "Variable '{}' is a GLOBAL variable and should be set with SET GLOBAL",
                            def.name
                        ),
                    ));
                }
                session.variables.insert(def.name.to_string(), value);
            }
        }
        Ok(())
    }

    /// Every system variable as `session` sees it, for DataFusion's `@@` lookups.
    fn variable_snapshot(
        &self,
        session: &Session,
    ) -> HashMap<String, datafusion::scalar::ScalarValue> {
        use datafusion::scalar::ScalarValue;
        let mut out = HashMap::new();
        for def in variables::VARIABLES {
            let Ok(v) = self.variable_value(session, None, def.name) else {
                continue;
            };
            let value = match def.kind {
                variables::Kind::Int { .. } => {
                    v.parse().map_or(ScalarValue::Utf8(Some(v.clone())), |i| {
                        ScalarValue::Int64(Some(i))
                    })
                }
                variables::Kind::Bool => ScalarValue::Int64(Some(i64::from(v == "ON"))),
                _ => ScalarValue::Utf8(Some(v)),
            };
            out.insert(def.name.to_string(), value);
        }
        out
    }

    fn select_constant(
        &self,
        session: &Session,
        query: &sqlparser::ast::Query,
    ) -> Result<QueryOutput, SqlError> {
        let SetExpr::Select(select) = query.body.as_ref() else {
            return Err(SqlError::unsupported("this form of SELECT"));
        };
        if !select.from.is_empty() || select.selection.is_some() {
            return Err(SqlError::unsupported("SELECT from tables"));
        }
        let ctx = Ctx {
            engine: self,
            session,
        };
        let mut columns = Vec::new();
        let mut row = Vec::new();
        for item in &select.projection {
            let (expr, name) = match item {
                SelectItem::UnnamedExpr(e) => (e, e.to_string()),
                SelectItem::ExprWithAlias { expr, alias } => (expr, alias.value.clone()),
                other => return Err(SqlError::unsupported(format!("select item {other}"))),
            };
            let v = eval(expr, &ctx)?;
            let kind = match &v {
                Value::Int(_) => ColumnKind::BigInt,
                Value::Double(_) => ColumnKind::Double,
                Value::Text(_) => ColumnKind::Text,
                Value::Null => ColumnKind::Null,
                Value::Bytes(_) => ColumnKind::Blob,
            };
            columns.push(Column { name, kind });
            row.push(v);
        }
        Ok(QueryOutput::Rows {
            columns,
            rows: vec![row],
        })
    }

    fn show_leaves(&self) -> QueryOutput {
        let rows = self.raft.read_catalog(|c| {
            c.leaves
                .values()
                .map(|l| {
                    let (host, port) = split_host_port(&l.address);
                    vec![
                        Value::Text(host),
                        port,
                        Value::Int(1),
                        Value::Null,
                        Value::Null,
                        Value::Text(if l.online { "online" } else { "offline" }.into()),
                        Value::Int(l.id.0 as i64),
                    ]
                })
                .collect()
        });
        QueryOutput::Rows {
            columns: vec![
                Column::text("Host"),
                Column::bigint("Port"),
                Column::bigint("Availability_Group"),
                Column::text("Pair_Host"),
                Column::bigint("Pair_Port"),
                Column::text("State"),
                Column::bigint("NodeId"),
            ],
            rows,
        }
    }

    /// The member REMOVE AGGREGATOR names: by id, or by its gRPC or MySQL address.
    fn resolve_aggregator(&self, target: &AggregatorRef) -> Result<NodeId, SqlError> {
        let found = self.raft.read_catalog(|c| match target {
            AggregatorRef::Id(id) => c.members.contains_key(&NodeId(*id)).then_some(NodeId(*id)),
            AggregatorRef::Address(addr) => c
                .members
                .iter()
                .find(|(id, m)| m.grpc_address == *addr || c.aggregators.get(id) == Some(addr))
                .map(|(id, _)| *id),
        });
        found.ok_or_else(|| {
            let what = match target {
                AggregatorRef::Id(id) => id.to_string(),
                AggregatorRef::Address(a) => format!("'{a}'"),
            };
            SqlError::new(
                codes::WRONG_ARGUMENTS,
                format!("aggregator {what} is not a member of this cluster (SHOW AGGREGATORS lists them)"),
            )
        })
    }

    async fn show_aggregators(&self) -> QueryOutput {
        let status = self.raft.status();
        let me = self.raft.node_id();
        let addresses = self.raft.read_catalog(|c| c.aggregators.clone());
        let mut rows = Vec::new();
        let grpc_of = self.raft.peers();
        let probes = grpc_of.iter().map(|(id, grpc)| {
            let id = *id;
            let grpc = grpc.clone();
            async move {
                if id == me {
                    let probe = Probe {
                        open_connections: self.connections.load(Ordering::Relaxed) as i64,
                        round_trip_ms: 0.0,
                        mysql_address: self.mysql_address.clone(),
                    };
                    (id, Some(probe))
                } else {
                    (id, probe_aggregator(&grpc).await)
                }
            }
        });
        for (id, probe) in futures::future::join_all(probes).await {
            // A live node says where it serves; the catalog remembers it for a down one.
            let (host, port) = match (&probe, addresses.get(&id)) {
                (Some(p), _) => split_host_port(&p.mysql_address),
                (None, Some(addr)) => split_host_port(addr),
                (None, None) => (split_host_port(&grpc_of[&id]).0, Value::Null),
            };
            let (state, conns, rtt) = match probe {
                Some(p) => (
                    "online",
                    Value::Int(p.open_connections),
                    Value::Double((p.round_trip_ms * 1000.0).round() / 1000.0),
                ),
                None => ("offline", Value::Null, Value::Null),
            };
            rows.push(vec![
                Value::Text(host),
                port,
                Value::Text(state.into()),
                conns,
                rtt,
                Value::Int(i64::from(status.leader == Some(id))),
                Value::Int(id.0 as i64),
            ]);
        }
        QueryOutput::Rows {
            columns: vec![
                Column::text("Host"),
                Column::bigint("Port"),
                Column::text("State"),
                Column::bigint("Opened_Connections"),
                Column {
                    name: "Average_Roundtrip_Latency_ms".into(),
                    kind: ColumnKind::Double,
                },
                Column::bigint("Master_Aggregator"),
                Column::bigint("NodeId"),
            ],
            rows,
        }
    }

    fn show_partitions(&self, db: &str) -> Result<QueryOutput, SqlError> {
        let rows = self.raft.read_catalog(|c| {
            c.databases.get(db).map(|d| {
                d.partitions
                    .iter()
                    .map(|p| {
                        let leaf = c.leaves.get(&p.leaf);
                        let (host, port) = leaf.map_or((String::new(), Value::Null), |l| {
                            split_host_port(&l.address)
                        });
                        let online = leaf.is_some_and(|l| l.online);
                        vec![
                            Value::Int(i64::from(p.ordinal)),
                            Value::Text(host),
                            port,
                            Value::Text("Master".into()),
                            Value::Int(0),
                            Value::Int(i64::from(!online)),
                            Value::Int(p.leaf.0 as i64),
                        ]
                    })
                    .collect::<Vec<_>>()
            })
        });
        let rows =
            rows.ok_or_else(|| SqlError::new(codes::BAD_DB, format!("Unknown database '{db}'")))?;
        Ok(QueryOutput::Rows {
            columns: vec![
                Column::bigint("Ordinal"),
                Column::text("Host"),
                Column::bigint("Port"),
                Column::text("Role"),
                Column::bigint("Locked"),
                Column::bigint("Is_Offline"),
                Column::bigint("Leaf_Id"),
            ],
            rows,
        })
    }
}

pub(super) fn no_database() -> SqlError {
    SqlError::new(codes::NO_DB, "No database selected")
}

//! The catalog: the Raft state machine every aggregator holds.
//!
//! It holds everything a restart must not lose and nothing that changes per heartbeat.
//! It changes only by [`Catalog::apply`] of a committed [`Command`], which is deterministic:
//! every replica applying the same log reaches the same state (times come in the command).

mod commands;
mod members;
pub mod pipelines;
mod requests;
pub mod tables;

use crate::error::{Error, Result};
use crate::ids::{LeafId, NodeId};
use crate::variables;
pub use commands::{Command, Output};
pub use members::{Member, MemberChange};
use pipelines::{BatchRef, Pipeline, PipelineDef, PipelineState, Unfinalized};
pub use requests::{RequestLog, REQUESTS_TO_KEEP};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use tables::Table;

/// Names that no user database may take.
pub const RESERVED_DATABASES: &[&str] = &["information_schema"];
/// The feature flag that gates Kafka Connect pipelines.
pub const KAFKA_CONNECT_FLAG: &str = "kafka_connect_enabled";
/// The most partitions one database may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// A leaf as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub id: LeafId,
    /// `host:port` of the leaf's gRPC service.
    pub address: String,
    pub online: bool,
    /// When `online` last changed (unix ms).
    pub since_ms: u64,
}

/// One partition of a database and the leaf that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub ordinal: u32,
    pub leaf: LeafId,
}

/// A database and the placement of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub name: String,
    pub partitions: Vec<Partition>,
    pub created_ms: u64,
    #[serde(default)]
    pub tables: BTreeMap<String, Table>,
}

impl Database {
    /// The leaves holding at least one partition, in id order.
    pub fn leaves(&self) -> Vec<LeafId> {
        let mut ids: Vec<LeafId> = self.partitions.iter().map(|p| p.leaf).collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// The replicated catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Global variables set by users (normalised values); the rest take their defaults.
    pub variables: BTreeMap<String, String>,
    pub databases: BTreeMap<String, Database>,
    pub leaves: BTreeMap<LeafId, Leaf>,
    pub next_leaf_id: u64,
    /// MySQL address (`host:port`) each aggregator serves clients at.
    pub aggregators: BTreeMap<NodeId, String>,
    #[serde(default)]
    pub pipelines: BTreeMap<u64, Pipeline>,
    #[serde(default)]
    pub next_pipeline_id: u64,
    /// The last table id handed out ([`Table::id`]).
    #[serde(default)]
    pub next_table_id: u64,
    /// Changes whenever a table is created or dropped (with its database, too): a leaf that saw
    /// this generation has already removed the rows of every table dropped before it.
    #[serde(default)]
    pub table_generation: u64,
    /// Every batch that committed and whose leaf has not confirmed yet that it made the rows
    /// visible ([`Command::BatchesFinalized`]). Kept whatever happens to the pipeline (stop,
    /// drop, task moves): a leaf that comes back with the batch still prepared must hear
    /// "committed", or it would delete rows the table already counts.
    #[serde(default, with = "requests::pairs")]
    pub unfinalized: BTreeMap<BatchRef, Unfinalized>,
    /// The outcomes of the last requests ([`Command::Request`]): a request proposed again
    /// (after an answer that was lost) gets its first outcome instead of running twice.
    #[serde(default)]
    pub requests: RequestLog,
    /// The cluster's identity, chosen by its first master ([`Command::InitCluster`]); every
    /// aggregator keeps it in its data directory too.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// The aggregators' Raft voters (mirrored from Raft's configuration changes).
    #[serde(default)]
    pub members: BTreeMap<NodeId, Member>,
    /// Ids that were members and were removed: never a member again.
    #[serde(default)]
    pub removed_members: BTreeSet<NodeId>,
}

/// The tables that exist, as leaves need to know them to delete the rows of dropped ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTables {
    pub generation: u64,
    /// Every table id handed out is at most this: a stored table with a higher id was created
    /// after this view (a lagging master's) and must be kept.
    pub high: u64,
    /// (id, database, name) of every table.
    pub tables: Vec<(u64, String, String)>,
}

impl Catalog {
    /// Applies a committed command. Errors are part of the result, identical on every replica.
    pub fn apply(&mut self, command: Command) -> Result<Output> {
        match command {
            Command::Request { id, command } => {
                if let Some(first) = self.requests.get(id) {
                    return first;
                }
                let outcome = self.apply(*command);
                self.requests.insert(id, outcome.clone());
                outcome
            }
            Command::SetVariable { name, value } => {
                let def = variables::lookup(&name)?;
                if def.access == variables::Access::ReadOnly {
                    return Err(Error::ReadOnlyVariable {
                        name: def.name.to_string(),
                    });
                }
                let value = def.normalize(&value)?;
                self.variables.insert(def.name.to_string(), value);
                Ok(Output::Done)
            }
            Command::CreateDatabase {
                name,
                partitions,
                if_not_exists,
                now_ms,
            } => {
                if self.databases.contains_key(&name)
                    || RESERVED_DATABASES.contains(&name.to_ascii_lowercase().as_str())
                {
                    return if if_not_exists {
                        Ok(Output::Unchanged)
                    } else {
                        Err(Error::DatabaseExists { name })
                    };
                }
                let online = self.online_leaves();
                if online.is_empty() {
                    return Err(Error::NoLeavesOnline { name });
                }
                let count = match partitions {
                    Some(n) => n,
                    None => self.variable_u32("default_partitions_per_leaf") * online.len() as u32,
                };
                if count == 0 || count > MAX_PARTITIONS {
                    return Err(Error::InvalidPartitionCount {
                        name,
                        count,
                        max: MAX_PARTITIONS,
                    });
                }
                let partitions = (0..count)
                    .map(|ordinal| Partition {
                        ordinal,
                        leaf: online[ordinal as usize % online.len()],
                    })
                    .collect();
                self.databases.insert(
                    name.clone(),
                    Database {
                        name,
                        partitions,
                        created_ms: now_ms,
                        tables: BTreeMap::new(),
                    },
                );
                Ok(Output::Done)
            }
            Command::RebalancePartitions { name } => {
                let per_leaf = self.variable_u32("default_partitions_per_leaf").max(1);
                let online = self.online_leaves();
                let db = self.database_mut(&name)?;
                let holders = db.leaves();
                let new_leaves: Vec<LeafId> = online
                    .into_iter()
                    .filter(|l| !holders.contains(l))
                    .collect();
                if new_leaves.is_empty() {
                    return Ok(Output::Unchanged);
                }
                let count = db.partitions.len() as u32 + per_leaf * new_leaves.len() as u32;
                if count > MAX_PARTITIONS {
                    return Err(Error::InvalidPartitionCount {
                        name,
                        count,
                        max: MAX_PARTITIONS,
                    });
                }
                let mut ordinal = db
                    .partitions
                    .iter()
                    .map(|p| p.ordinal + 1)
                    .max()
                    .unwrap_or(0);
                for leaf in new_leaves {
                    for _ in 0..per_leaf {
                        db.partitions.push(Partition { ordinal, leaf });
                        ordinal += 1;
                    }
                }
                Ok(Output::Done)
            }
            Command::DropDatabase { name, if_exists } => {
                if self.databases.remove(&name).is_some() {
                    self.pipelines.retain(|_, p| p.database != name);
                    self.table_generation += 1;
                    Ok(Output::Done)
                } else if if_exists {
                    Ok(Output::Unchanged)
                } else {
                    Err(Error::DatabaseNotFound { name })
                }
            }
            Command::RegisterLeaf {
                address,
                now_ms,
                holding,
            } => {
                if let Some(leaf) = self.leaves.values_mut().find(|l| l.address == address) {
                    if !leaf.online {
                        leaf.online = true;
                        leaf.since_ms = now_ms;
                    }
                    let id = leaf.id;
                    if let Some(holding) = holding {
                        let holding: std::collections::BTreeSet<BatchRef> =
                            holding.into_iter().collect();
                        self.unfinalized
                            .retain(|b, u| u.leaf != Some(id) || holding.contains(b));
                    }
                    return Ok(Output::Leaf(id));
                }
                self.next_leaf_id += 1;
                let id = LeafId(self.next_leaf_id);
                self.leaves.insert(
                    id,
                    Leaf {
                        id,
                        address,
                        online: true,
                        since_ms: now_ms,
                    },
                );
                Ok(Output::Leaf(id))
            }
            Command::SetLeafOnline { id, online, now_ms } => {
                let leaf = self
                    .leaves
                    .get_mut(&id)
                    .ok_or(Error::LeafNotFound { id: id.0 })?;
                if leaf.online == online {
                    return Ok(Output::Unchanged);
                }
                leaf.online = online;
                leaf.since_ms = now_ms;
                Ok(Output::Done)
            }
            Command::InitCluster {
                cluster_id,
                members,
            } => self.init_cluster(cluster_id, members),
            Command::JoinMember { node } => self.join_member(node),
            Command::AddMember { node, grpc_address } => self.add_member(node, grpc_address),
            Command::RemoveMember { node } => self.remove_member(node),
            Command::SetAggregatorAddress {
                node,
                mysql_address,
            } => {
                if self.removed_members.contains(&node) {
                    return Ok(Output::Unchanged);
                }
                if self.aggregators.get(&node) == Some(&mysql_address) {
                    return Ok(Output::Unchanged);
                }
                self.aggregators.insert(node, mysql_address);
                Ok(Output::Done)
            }
            Command::CreateTable {
                mut table,
                if_not_exists,
            } => {
                let id = self.next_table_id + 1;
                let db = self.database_mut(&table.database)?;
                if db.tables.contains_key(&table.name) {
                    return if if_not_exists {
                        Ok(Output::Unchanged)
                    } else {
                        Err(Error::TableExists {
                            database: table.database,
                            name: table.name,
                        })
                    };
                }
                table.id = id;
                db.tables.insert(table.name.clone(), table);
                self.next_table_id = id;
                self.table_generation += 1;
                Ok(Output::Done)
            }
            Command::DropTable {
                database,
                name,
                if_exists,
            } => {
                if let Some(p) = self
                    .pipelines
                    .values()
                    .find(|p| p.database == database && p.table == name)
                {
                    return Err(Error::InvalidPipeline {
                        name: p.name.clone(),
                        reason: format!("loads table '{name}'; drop the pipeline first"),
                    });
                }
                let db = self.database_mut(&database)?;
                match db.tables.remove(&name) {
                    Some(_) => {
                        self.table_generation += 1;
                        Ok(Output::Done)
                    }
                    None if if_exists => Ok(Output::Unchanged),
                    None => Err(Error::TableNotFound { database, name }),
                }
            }
            Command::AddColumn {
                database,
                table,
                column,
            } => {
                let db = self.database_mut(&database)?;
                let t = db.tables.get_mut(&table).ok_or(Error::TableNotFound {
                    database: database.clone(),
                    name: table.clone(),
                })?;
                if t.column(&column.name).is_some() {
                    return Err(Error::DuplicateColumn { name: column.name });
                }
                t.columns.push(column);
                Ok(Output::Done)
            }
            Command::CreateIndex {
                database,
                table,
                index,
            } => {
                let t = self.table_mut(&database, &table)?;
                if t.indexes.iter().any(|i| i.name == index.name) {
                    return Err(Error::DuplicateIndex { name: index.name });
                }
                if t.column(&index.column).is_none() {
                    return Err(Error::UnknownColumn { name: index.column });
                }
                t.indexes.push(index);
                Ok(Output::Done)
            }
            Command::DropIndex {
                database,
                table,
                name,
            } => {
                let t = self.table_mut(&database, &table)?;
                let before = t.indexes.len();
                t.indexes.retain(|i| i.name != name);
                if t.indexes.len() == before {
                    return Err(Error::UnknownIndex { name });
                }
                Ok(Output::Done)
            }
            Command::CreatePipeline {
                def,
                or_replace,
                if_not_exists,
                now_ms,
            } => self.create_pipeline(def, or_replace, if_not_exists, now_ms),
            Command::StartPipeline {
                database,
                name,
                tasks,
                if_not_running,
                now_ms,
            } => {
                if !self.feature_enabled(KAFKA_CONNECT_FLAG) {
                    return Err(Error::FeatureDisabled);
                }
                let p = self.pipeline_mut(&database, &name)?;
                Ok(if p.start(tasks, if_not_running, now_ms)? {
                    Output::Done
                } else {
                    Output::Unchanged
                })
            }
            Command::StopPipeline {
                database,
                name,
                if_running,
                now_ms,
            } => {
                let p = self.pipeline_mut(&database, &name)?;
                if p.state != PipelineState::Running {
                    return if if_running || p.state == PipelineState::Error {
                        p.stop(PipelineState::Stopped, now_ms);
                        Ok(Output::Unchanged)
                    } else {
                        Err(Error::PipelineNotRunning { name })
                    };
                }
                p.stop(PipelineState::Stopped, now_ms);
                Ok(Output::Done)
            }
            Command::DropPipeline {
                database,
                name,
                if_exists,
            } => match self.pipeline_id(&database, &name) {
                Ok(id) => {
                    self.pipelines.remove(&id);
                    Ok(Output::Done)
                }
                Err(_) if if_exists => Ok(Output::Unchanged),
                Err(e) => Err(e),
            },
            Command::AlterPipeline {
                database,
                name,
                change,
                now_ms,
            } => {
                self.pipeline_mut(&database, &name)?.alter(change, now_ms)?;
                Ok(Output::Done)
            }
            Command::AssignTask {
                pipeline_id,
                task_id,
                leaf,
            } => Ok(Output::Epoch(
                self.pipeline_by_id(pipeline_id)?.assign(task_id, leaf)?,
            )),
            Command::CommitBatch(batch) => {
                let key = batch.batch_ref();
                if let Some(u) = self.unfinalized.get(&key) {
                    return Ok(Output::Batch(u.batch_id)); // a retried commit: same answer
                }
                let keep = self.variable_u32("pipelines_batches_metadata_to_keep") as usize;
                let p = self.pipeline_by_id(batch.pipeline_id)?;
                let leaf = p
                    .tasks
                    .iter()
                    .find(|t| t.task_id == batch.task_id)
                    .and_then(|t| t.leaf);
                let batch_id = p.commit(batch, keep)?;
                self.unfinalized.insert(key, Unfinalized { batch_id, leaf });
                Ok(Output::Batch(batch_id))
            }
            Command::BatchesFinalized { batches } => {
                for b in &batches {
                    self.unfinalized.remove(b);
                }
                Ok(Output::Done)
            }
            Command::FenceTask {
                pipeline_id,
                task_id,
                epoch,
            } => Ok(if self.pipeline_by_id(pipeline_id)?.fence(task_id, epoch) {
                Output::Done
            } else {
                Output::Unchanged
            }),
            Command::PipelineFailure {
                pipeline_id,
                task_id,
                epoch,
                error,
                fatal,
                now_ms,
            } => {
                let global_stop = self.variable("pipelines_stop_on_error").as_deref() == Some("ON");
                let p = self.pipeline_by_id(pipeline_id)?;
                let current = p
                    .tasks
                    .iter()
                    .any(|t| t.task_id == task_id && t.epoch == epoch);
                let mut error = error;
                if !current {
                    // An earlier run of a task that has moved since (its leaf was cut off, or
                    // the task was rebalanced) reports late: not the pipeline's error now.
                    error.error_type = "Warning".into();
                    error.message = format!(
                        "from an earlier run of task {task_id} (epoch {epoch}), which has moved since: {}",
                        error.message
                    );
                }
                p.record_error(error);
                if !(fatal && current && p.state == PipelineState::Running) {
                    return Ok(Output::Unchanged);
                }
                if p.stop_on_error.unwrap_or(global_stop) {
                    p.stop(PipelineState::Error, now_ms);
                } else {
                    p.skipped_batch_partitions += 1;
                }
                Ok(Output::Done)
            }
            Command::ClearPipelineErrors { database, name } => {
                for p in self.pipelines.values_mut() {
                    if p.database == database && name.as_ref().is_none_or(|n| *n == p.name) {
                        p.errors.clear();
                    }
                }
                Ok(Output::Done)
            }
        }
    }

    fn create_pipeline(
        &mut self,
        def: PipelineDef,
        or_replace: bool,
        if_not_exists: bool,
        now_ms: u64,
    ) -> Result<Output> {
        if !self.feature_enabled(KAFKA_CONNECT_FLAG) {
            return Err(Error::FeatureDisabled);
        }
        let name = def.name.clone();
        let existing = self.pipeline_id(&def.database, &def.name).ok();
        if let Some(id) = existing {
            if if_not_exists {
                return Ok(Output::Unchanged);
            }
            if !or_replace {
                return Err(Error::PipelineExists { name });
            }
            if self.pipelines[&id].state == PipelineState::Running {
                return Err(Error::PipelineRunning { name });
            }
        }
        let table_id = self.next_table_id + 1;
        let mut created_table = false;
        let db = self.database_mut(&def.database)?;
        match db.tables.get(&def.table) {
            Some(t) => t
                .check_static_schema()
                .map_err(|reason| Error::InvalidPipeline {
                    name: name.clone(),
                    reason,
                })?,
            None if def.inferred => {
                let mut t = Table::kafka_connect_static(&def.database, &def.table, now_ms);
                t.id = table_id;
                db.tables.insert(def.table.clone(), t);
                created_table = true;
            }
            None => {
                return Err(Error::TableNotFound {
                    database: def.database.clone(),
                    name: def.table.clone(),
                })
            }
        }
        if created_table {
            self.next_table_id = table_id;
            self.table_generation += 1;
        }
        if let Some(id) = existing {
            if let Some(p) = self.pipelines.get_mut(&id) {
                p.redefine(def, now_ms);
            }
            return Ok(Output::Pipeline(id));
        }
        self.next_pipeline_id += 1;
        let id = self.next_pipeline_id;
        self.pipelines.insert(id, Pipeline::new(id, def, now_ms));
        Ok(Output::Pipeline(id))
    }

    /// The BATCH_ID of a batch if it committed. Final once the batch's epoch is fenced.
    pub fn committed_batch(&self, b: &BatchRef) -> Option<u64> {
        if let Some(u) = self.unfinalized.get(b) {
            return Some(u.batch_id);
        }
        self.pipelines
            .get(&b.pipeline_id)?
            .committed_batch(b.task_id, b.epoch, b.seq)
    }

    /// The tables that exist now (what a leaf keeps).
    pub fn live_tables(&self) -> LiveTables {
        LiveTables {
            generation: self.table_generation,
            high: self.next_table_id,
            tables: self
                .databases
                .values()
                .flat_map(|d| d.tables.values())
                .map(|t| (t.id, t.database.clone(), t.name.clone()))
                .collect(),
        }
    }

    /// The ids of the leaves online now, in id order.
    fn online_leaves(&self) -> Vec<LeafId> {
        self.leaves
            .values()
            .filter(|l| l.online)
            .map(|l| l.id)
            .collect()
    }

    fn database_mut(&mut self, name: &str) -> Result<&mut Database> {
        self.databases
            .get_mut(name)
            .ok_or_else(|| Error::UnknownDatabase {
                name: name.to_string(),
            })
    }

    /// The id of a pipeline by database and name.
    pub fn pipeline_id(&self, database: &str, name: &str) -> Result<u64> {
        self.pipelines
            .values()
            .find(|p| p.database == database && p.name == name)
            .map(|p| p.id)
            .ok_or_else(|| Error::PipelineNotFound {
                name: name.to_string(),
            })
    }

    /// A pipeline by database and name.
    pub fn pipeline(&self, database: &str, name: &str) -> Result<&Pipeline> {
        let id = self.pipeline_id(database, name)?;
        Ok(&self.pipelines[&id])
    }

    fn pipeline_mut(&mut self, database: &str, name: &str) -> Result<&mut Pipeline> {
        let id = self.pipeline_id(database, name)?;
        self.pipeline_by_id(id)
    }

    fn pipeline_by_id(&mut self, id: u64) -> Result<&mut Pipeline> {
        self.pipelines
            .get_mut(&id)
            .ok_or_else(|| Error::PipelineNotFound {
                name: format!("#{id}"),
            })
    }

    fn table_mut(&mut self, database: &str, table: &str) -> Result<&mut Table> {
        self.database_mut(database)?
            .tables
            .get_mut(table)
            .ok_or_else(|| Error::TableNotFound {
                database: database.to_string(),
                name: table.to_string(),
            })
    }

    /// A table by database and name.
    pub fn table(&self, database: &str, name: &str) -> Option<&Table> {
        self.databases.get(database)?.tables.get(name)
    }

    /// The global value of a variable: the user's, else the default. `None` if unknown.
    pub fn variable(&self, name: &str) -> Option<String> {
        let def = variables::lookup(name).ok()?;
        Some(
            self.variables
                .get(def.name)
                .cloned()
                .unwrap_or_else(|| def.default.to_string()),
        )
    }

    pub fn variable_u32(&self, name: &str) -> u32 {
        self.variable(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    /// Whether an experimental feature is switched on in `experimental_features_config`.
    pub fn feature_enabled(&self, flag: &str) -> bool {
        self.variable("experimental_features_config")
            .is_some_and(|v| variables::feature_enabled(&v, flag))
    }
}

#[cfg(test)]
mod tests;

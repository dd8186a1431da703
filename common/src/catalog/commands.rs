//! The changes to the catalog that go through Raft ([`Command`]) and what applying one
//! produced ([`Output`]); [`super::Catalog::apply`] carries them out.

use super::pipelines::{BatchCommit, BatchRef, PipelineChange, PipelineDef, PipelineError};
use super::tables::{self, Table};
use crate::ids::{LeafId, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A change to the catalog, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SetVariable {
        name: String,
        value: String,
    },
    CreateDatabase {
        name: String,
        /// `None`: `default_partitions_per_leaf` x online leaves.
        partitions: Option<u32>,
        if_not_exists: bool,
        now_ms: u64,
    },
    DropDatabase {
        name: String,
        if_exists: bool,
    },
    /// `REBALANCE PARTITIONS ON db`: every online leaf that holds no partition of the database
    /// gets `default_partitions_per_leaf` new, empty ones, so that it stores rows and runs the
    /// database's pipeline tasks. Rows already loaded stay where they are.
    RebalancePartitions {
        name: String,
    },
    /// Registers a leaf by address; a leaf that registers again (e.g. after losing its data
    /// directory) gets its old id back.
    RegisterLeaf {
        address: String,
        now_ms: u64,
        /// From a leaf process that just started: every batch it holds. The committed batches
        /// kept for it (`unfinalized`) that it does not hold are forgotten: nothing will ask
        /// about them again (a leaf whose disk was wiped holds none).
        #[serde(default)]
        holding: Option<Vec<BatchRef>>,
    },
    SetLeafOnline {
        id: LeafId,
        online: bool,
        now_ms: u64,
    },
    /// An aggregator announces the MySQL address it serves at.
    SetAggregatorAddress {
        node: NodeId,
        mysql_address: String,
    },
    CreateTable {
        table: Table,
        if_not_exists: bool,
    },
    DropTable {
        database: String,
        name: String,
        if_exists: bool,
    },
    /// `ALTER TABLE t ADD COLUMN c ...` (computed columns are filled on the leaves).
    AddColumn {
        database: String,
        table: String,
        column: tables::TableColumn,
    },
    CreateIndex {
        database: String,
        table: String,
        index: tables::Index,
    },
    DropIndex {
        database: String,
        table: String,
        name: String,
    },
    CreatePipeline {
        def: PipelineDef,
        or_replace: bool,
        if_not_exists: bool,
        now_ms: u64,
    },
    StartPipeline {
        database: String,
        name: String,
        /// One config per task, from the connector (`task_configs`).
        tasks: Vec<BTreeMap<String, String>>,
        if_not_running: bool,
        now_ms: u64,
    },
    StopPipeline {
        database: String,
        name: String,
        if_running: bool,
        now_ms: u64,
    },
    DropPipeline {
        database: String,
        name: String,
        if_exists: bool,
    },
    AlterPipeline {
        database: String,
        name: String,
        change: PipelineChange,
        now_ms: u64,
    },
    /// The scheduler (re)assigns a task; the task gets a new epoch.
    AssignTask {
        pipeline_id: u64,
        task_id: u32,
        leaf: Option<LeafId>,
    },
    CommitBatch(BatchCommit),
    /// A leaf made these committed batches visible: the catalog may forget them.
    BatchesFinalized {
        batches: Vec<BatchRef>,
    },
    /// Ends an epoch so none of its batches can commit any more (batch recovery).
    FenceTask {
        pipeline_id: u64,
        task_id: u32,
        epoch: u64,
    },
    /// A task failed; `fatal` once its retries are exhausted.
    PipelineFailure {
        pipeline_id: u64,
        task_id: u32,
        epoch: u64,
        error: PipelineError,
        fatal: bool,
        now_ms: u64,
    },
    ClearPipelineErrors {
        database: String,
        name: Option<String>,
    },
    /// The first master records the cluster's identity and the members it was created with
    /// (they all joined: each started with its own new data directory). Once only.
    InitCluster {
        cluster_id: String,
        members: BTreeMap<NodeId, String>,
    },
    /// An aggregator that starts with a new data directory, under an id ADD AGGREGATOR made a
    /// member, joins; refused if that id has joined before (its data was lost: it must be
    /// replaced, not rejoin).
    JoinMember {
        node: NodeId,
    },
    /// `ADD AGGREGATOR`: proposed as a Raft configuration change that carries this command.
    AddMember {
        node: NodeId,
        grpc_address: String,
    },
    /// `REMOVE AGGREGATOR`: proposed as a Raft configuration change that carries this command.
    RemoveMember {
        node: NodeId,
    },
    /// A command with the proposer's request id: applied once, however often it is proposed
    /// (a proposer whose answer was lost proposes it again and gets the first outcome).
    Request {
        id: u64,
        command: Box<Command>,
    },
}

impl Command {
    /// Whether applying the command can change what a query plans against: databases,
    /// tables, columns, indexes, leaves and where partitions live. A pipeline's progress
    /// (batches, offsets, task assignments, errors, its state) does not, so the planning
    /// environment and the plans kept in it outlive a running pipeline's commits; conservative
    /// for everything else.
    pub fn changes_tables(&self) -> bool {
        match self {
            Command::StartPipeline { .. }
            | Command::StopPipeline { .. }
            | Command::AssignTask { .. }
            | Command::CommitBatch(_)
            | Command::BatchesFinalized { .. }
            | Command::FenceTask { .. }
            | Command::PipelineFailure { .. }
            | Command::ClearPipelineErrors { .. }
            | Command::SetAggregatorAddress { .. } => false,
            Command::Request { command, .. } => command.changes_tables(),
            _ => true,
        }
    }
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// The change was made.
    Done,
    /// Nothing to do (`IF [NOT] EXISTS`, or already in that state).
    Unchanged,
    /// The id of a registered leaf.
    Leaf(LeafId),
    /// The BATCH_ID of a committed batch.
    Batch(u64),
    /// The epoch a task was assigned.
    Epoch(u64),
    /// The id of a created pipeline.
    Pipeline(u64),
    /// The cluster's id (a member joined).
    Cluster(String),
}

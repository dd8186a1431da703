//! The master's side of the batch protocol: commit decisions (through Raft), resolution of
//! prepared batches after a leaf restart, task failures, and the assignments a leaf runs.

use crate::error::{Error, Result};
use crate::raft::RaftHandle;
use crate::sql::exec::now_ms;
use common::catalog::pipelines::{BatchCommit, BatchRef, PipelineError, PipelineState};
use common::catalog::{Catalog, Command, Output};
use common::connect::avro::canonical_json;
use common::ids::LeafId;

/// Commits a batch. `Ok(Ok(batch_id))`: committed (now or by an earlier try);
/// `Ok(Err(reason))`: refused for good; `Err`: outcome unknown, the leaf retries.
pub async fn commit(raft: &RaftHandle, batch: BatchCommit) -> Result<Result<u64, String>> {
    if !raft.is_leader() {
        return Err(raft.not_leader());
    }
    match raft.propose(Command::CommitBatch(batch)).await {
        Ok(Output::Batch(id)) => Ok(Ok(id)),
        Ok(other) => Err(Error::Corrupt(format!("CommitBatch returned {other:?}"))),
        Err(Error::Catalog(e)) => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Whether a prepared batch committed; the answer is final because the batch's epoch is
/// fenced first (no batch of it can commit afterwards).
pub async fn resolve(
    raft: &RaftHandle,
    pipeline_id: u64,
    task_id: u32,
    epoch: u64,
    seq: u64,
) -> Result<Option<u64>> {
    if !raft.is_leader() {
        return Err(raft.not_leader());
    }
    let batch = BatchRef {
        pipeline_id,
        task_id,
        epoch,
        seq,
    };
    let committed = |raft: &RaftHandle| {
        raft.read_catalog(|c| {
            (
                c.committed_batch(&batch),
                c.pipelines.contains_key(&pipeline_id),
            )
        })
    };
    match committed(raft) {
        (Some(id), _) => return Ok(Some(id)),
        // The pipeline is gone and the batch is not among the committed ones: nothing can
        // commit it any more.
        (None, false) => return Ok(None),
        (None, true) => {}
    }
    match raft
        .propose(Command::FenceTask {
            pipeline_id,
            task_id,
            epoch,
        })
        .await
    {
        Ok(_) | Err(Error::Catalog(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(committed(raft).0)
}

/// A leaf made these committed batches visible: the catalog forgets them.
pub async fn finalized(raft: &RaftHandle, batches: Vec<BatchRef>) -> Result<()> {
    if !raft.is_leader() {
        return Err(raft.not_leader());
    }
    if batches.is_empty() {
        return Ok(());
    }
    raft.propose(Command::BatchesFinalized { batches }).await?;
    Ok(())
}

/// Records a task failure (fatal ones may move the pipeline to Error).
pub async fn report_error(raft: &RaftHandle, req: proto::TaskErrorRequest) -> Result<()> {
    if !raft.is_leader() {
        return Err(raft.not_leader());
    }
    let batch_id =
        raft.read_catalog(|c| c.pipelines.get(&req.pipeline_id).map(|p| p.next_batch_id));
    let error = PipelineError {
        error_id: 0,
        unix_ms: now_ms(),
        error_type: "Error".into(),
        code: 1934,
        message: req.message,
        batch_id,
        host: req.host,
        port: u16::try_from(req.port).ok(),
        partition: (!req.partition.is_empty()).then_some(req.partition),
    };
    match raft
        .propose(Command::PipelineFailure {
            pipeline_id: req.pipeline_id,
            task_id: req.task_id,
            epoch: req.epoch,
            error,
            fatal: req.fatal,
            now_ms: now_ms(),
        })
        .await
    {
        Ok(_) | Err(Error::Catalog(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// What a leaf holds of each pipeline's committed offsets: pipeline -> (generation, BATCH_ID
/// up to which every committed offset is included).
pub type OffsetsSeen = std::collections::HashMap<u64, (u64, u64)>;

/// The tasks `leaf` should run, with everything it needs to run them. The committed offsets
/// come whole, or only those committed since what the leaf holds (`seen`): a heartbeat then
/// grows with what changed, not with every source partition the pipeline ever read (a stream
/// resharded for months has thousands of closed shards).
pub fn assignments(
    catalog: &Catalog,
    leaf: LeafId,
    seen: &OffsetsSeen,
) -> Vec<proto::TaskAssignment> {
    let var = |n: &str| u64::from(catalog.variable_u32(n));
    let mut out = Vec::new();
    for p in catalog
        .pipelines
        .values()
        .filter(|p| p.state == PipelineState::Running)
    {
        let mine: Vec<_> = p
            .tasks
            .iter()
            .filter(|t| t.leaf == Some(leaf) && t.epoch != 0)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let partitions: Vec<u32> = catalog
            .databases
            .get(&p.database)
            .map(|d| {
                d.partitions
                    .iter()
                    .filter(|pt| pt.leaf == leaf)
                    .map(|pt| pt.ordinal)
                    .collect()
            })
            .unwrap_or_default();
        let config = common::connect::effective_config(&p.config, &p.credentials)
            .map(|c| serde_json::Value::Object(c).to_string())
            .unwrap_or_else(|_| serde_json::Value::Object(p.config.clone()).to_string());
        // Every batch below the next BATCH_ID has committed (ids are consecutive).
        let offsets_batch_id = p.next_batch_id.saturating_sub(1);
        let since = seen
            .get(&p.id)
            .filter(|(generation, _)| *generation == p.offsets_generation)
            .map(|(_, batch_id)| *batch_id);
        let offsets: Vec<proto::SourceOffset> = p
            .offsets
            .iter()
            .filter(|(_, o)| since.is_none_or(|b| o.batch_id > b))
            .map(|(k, o)| proto::SourceOffset {
                key: k.clone(),
                value_json: canonical_json(&o.value),
                finished: o.finished,
            })
            .collect();
        let table = catalog.table(&p.database, &p.table);
        let columns = table
            .map(|t| query::columns::to_proto(&t.columns))
            .unwrap_or_default();
        let table_id = table.map_or(0, |t| t.id);
        for t in mine {
            out.push(proto::TaskAssignment {
                pipeline_id: p.id,
                pipeline: p.name.clone(),
                database: p.database.clone(),
                table: p.table.clone(),
                task_id: t.task_id,
                epoch: t.epoch,
                config_json: config.clone(),
                task_config_json: serde_json::to_string(&t.config).unwrap_or_default(),
                offsets: offsets.clone(),
                start_override: match p.start_override {
                    Some(common::catalog::pipelines::StartOverride::Earliest) => "earliest".into(),
                    Some(common::catalog::pipelines::StartOverride::Latest) => "latest".into(),
                    None => String::new(),
                },
                batch_size: var("pipelines_extractor_batch_size"),
                max_batch_interval_ms: var("pipelines_extractor_max_batch_interval_ms"),
                batch_interval_ms: p
                    .batch_interval_ms
                    .unwrap_or_else(|| var("pipelines_batch_interval")),
                max_retries: p.max_retries.unwrap_or_else(|| {
                    catalog.variable_u32("pipelines_max_retries_per_batch_partition")
                }),
                partitions: partitions.clone(),
                columns: columns.clone(),
                table_id,
                start_at_ms: p.start_ms.unwrap_or(0),
                offsets_delta: since.is_some(),
                stop_on_error: p.stop_on_error.unwrap_or_else(|| {
                    catalog.variable("pipelines_stop_on_error").as_deref() == Some("ON")
                }),
                offsets_generation: p.offsets_generation,
                offsets_batch_id,
            });
        }
    }
    out
}

/// The tables that exist, for a leaf that last applied `generation` (`None` if that is the
/// catalog's: the leaf is up to date).
pub fn live_tables(catalog: &Catalog, generation: u64) -> Option<proto::LiveTables> {
    if catalog.table_generation == generation {
        return None; // the common case: built only when the leaf needs it
    }
    let live = catalog.live_tables();
    Some(proto::LiveTables {
        generation: live.generation,
        high: live.high,
        tables: live
            .tables
            .into_iter()
            .map(|(id, database, name)| proto::LiveTable { id, database, name })
            .collect(),
    })
}

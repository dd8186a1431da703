//! Pipelines in the catalog: definition, state, tasks with fencing epochs, committed source
//! offsets, and bounded histories of batches and errors.
//!
//! The exactly-once decisions live here, in [`super::Catalog::apply`]: a batch commits only
//! if its task holds the current epoch of a running pipeline and the offsets it read from
//! are still the committed ones (compare-and-set); a batch that already committed answers
//! with its original id, so commits can be retried.

use crate::error::{Error, Result};
use crate::ids::LeafId;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::collections::{BTreeMap, VecDeque};

/// A pipeline's state as `information_schema.PIPELINES` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipelineState {
    Running,
    Stopped,
    Error,
}

impl PipelineState {
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Running => "Running",
            PipelineState::Stopped => "Stopped",
            PipelineState::Error => "Error",
        }
    }
}

/// Where a source partition without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartOverride {
    Earliest,
    Latest,
}

/// One task of a running pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub task_id: u32,
    /// The connector's configuration for this task (`SourceConnector::task_configs`).
    pub config: BTreeMap<String, String>,
    /// The leaf running it, if assigned.
    pub leaf: Option<LeafId>,
    /// Fencing token: grows with every (re)assignment; only the current epoch commits.
    pub epoch: u64,
    /// Last committed batch per epoch: (leaf-side sequence, BATCH_ID). Bounded.
    pub committed: BTreeMap<u64, (u64, u64)>,
}

/// A committed source offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceOffset {
    /// The connector's offset (`VALUE`), e.g. `{"sequenceNumber":"..."}`.
    pub value: Json,
    pub task_id: u32,
    pub batch_id: u64,
    /// The source partition has ended (a closed shard read to its end).
    pub finished: bool,
}

/// One row of `PIPELINES_BATCHES_SUMMARY`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchSummary {
    pub batch_id: u64,
    pub task_id: u32,
    pub succeeded: bool,
    pub start_ms: u64,
    pub extractor_wait_ms: u64,
    pub batch_time_ms: u64,
    pub rows: u64,
    pub bytes: u64,
    pub num_partitions: u32,
}

/// One row of `PIPELINES_ERRORS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineError {
    pub error_id: u64,
    pub unix_ms: u64,
    /// `Error` or `Warning`.
    pub error_type: String,
    pub code: u16,
    pub message: String,
    pub batch_id: Option<u64>,
    pub host: String,
    pub port: Option<u16>,
    pub partition: Option<String>,
}

/// A pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: u64,
    pub database: String,
    pub name: String,
    /// The `KAFKACONNECT '<name>'` literal.
    pub connector: String,
    /// CONFIG as a JSON object. Holds secrets for some connectors: never show it unredacted.
    pub config: serde_json::Map<String, Json>,
    /// CREDENTIALS JSON text. Never shown.
    pub credentials: String,
    pub table: String,
    pub inferred: bool,
    pub batch_interval_ms: Option<u64>,
    pub max_retries: Option<u32>,
    pub stop_on_error: Option<bool>,
    pub state: PipelineState,
    pub created_ms: u64,
    pub altered_ms: u64,
    pub next_batch_id: u64,
    pub next_epoch: u64,
    pub skipped_batch_partitions: u64,
    pub tasks: Vec<Task>,
    /// Committed offsets by source partition (`KEY`, canonical JSON text).
    pub offsets: BTreeMap<String, SourceOffset>,
    pub start_override: Option<StartOverride>,
    pub batches: VecDeque<BatchSummary>,
    pub errors: VecDeque<PipelineError>,
    pub next_error_id: u64,
    /// When the start position of source partitions without a committed offset was fixed
    /// (the first START after creation or after ALTER ... SET OFFSETS): a connector starting
    /// at "latest" reads what arrived from then on, however often its task restarts before
    /// it commits (deciding "latest" again at each start would skip what came in between).
    #[serde(default)]
    pub start_ms: Option<u64>,
    /// Rows of every batch committed so far (not bounded like `batches`): FOREGROUND counts
    /// a run's rows from it, however many batches the run has.
    #[serde(default)]
    pub rows_loaded: u64,
    /// Moves when the committed offsets are replaced (ALTER ... SET OFFSETS): a leaf holding
    /// offsets of an older generation gets them all again, not only what changed.
    #[serde(default)]
    pub offsets_generation: u64,
}

/// How many errors a pipeline keeps.
pub const ERRORS_TO_KEEP: usize = 1000;
/// How many past epochs per task remember their last committed batch (for retried commits;
/// whether a prepared batch committed is the catalog's `unfinalized`).
const EPOCHS_TO_KEEP: usize = 8;

/// The definition part of CREATE PIPELINE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineDef {
    pub database: String,
    pub name: String,
    pub connector: String,
    pub config: serde_json::Map<String, Json>,
    pub credentials: String,
    pub table: String,
    pub inferred: bool,
    pub batch_interval_ms: Option<u64>,
    pub max_retries: Option<u32>,
    pub stop_on_error: Option<bool>,
}

/// A change of ALTER PIPELINE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipelineChange {
    /// Replace the committed offsets: `None` with an override (EARLIEST/LATEST), or the
    /// given `(KEY, VALUE)` pairs.
    Offsets {
        start: Option<StartOverride>,
        offsets: Vec<(String, Json)>,
    },
    BatchInterval(u64),
    Config(serde_json::Map<String, Json>),
    Credentials(String),
    MaxRetries(u32),
    StopOnError(bool),
}

/// An offset moved by a batch: from what the task read after, to the last record loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetUpdate {
    pub key: String,
    pub from: Option<Json>,
    pub to: Json,
    pub finished: bool,
    /// On a partition's first commit: the ended partitions it continues, whose offsets the
    /// catalog then forgets ([`crate::connect::SourceTask::continues`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub continues: Vec<String>,
}

/// Names one batch of a pipeline: its task, the task's epoch and the leaf's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BatchRef {
    pub pipeline_id: u64,
    pub task_id: u32,
    pub epoch: u64,
    pub seq: u64,
}

/// A batch that committed and that its leaf has not yet said it made visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unfinalized {
    pub batch_id: u64,
    /// The leaf that held the task when the batch committed.
    pub leaf: Option<LeafId>,
}

/// What a leaf reports about a prepared batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchCommit {
    pub pipeline_id: u64,
    pub task_id: u32,
    pub epoch: u64,
    pub seq: u64,
    pub offsets: Vec<OffsetUpdate>,
    pub start_ms: u64,
    pub extractor_wait_ms: u64,
    pub batch_time_ms: u64,
    pub rows: u64,
    pub bytes: u64,
    pub num_partitions: u32,
}

impl BatchCommit {
    pub fn batch_ref(&self) -> BatchRef {
        BatchRef {
            pipeline_id: self.pipeline_id,
            task_id: self.task_id,
            epoch: self.epoch,
            seq: self.seq,
        }
    }
}

impl Pipeline {
    pub fn new(id: u64, def: PipelineDef, now_ms: u64) -> Self {
        let mut p = Pipeline {
            id,
            database: def.database.clone(),
            name: def.name.clone(),
            connector: String::new(),
            config: serde_json::Map::new(),
            credentials: String::new(),
            table: String::new(),
            inferred: false,
            batch_interval_ms: None,
            max_retries: None,
            stop_on_error: None,
            state: PipelineState::Stopped,
            created_ms: now_ms,
            altered_ms: now_ms,
            next_batch_id: 1,
            next_epoch: 1,
            skipped_batch_partitions: 0,
            tasks: vec![],
            offsets: BTreeMap::new(),
            start_override: None,
            batches: VecDeque::new(),
            errors: VecDeque::new(),
            next_error_id: 1,
            start_ms: None,
            rows_loaded: 0,
            offsets_generation: 0,
        };
        p.redefine(def, now_ms);
        p
    }

    /// Replaces the definition (CREATE OR REPLACE), keeping offsets, history and id.
    pub fn redefine(&mut self, def: PipelineDef, now_ms: u64) {
        self.connector = def.connector;
        self.config = def.config;
        self.credentials = def.credentials;
        self.table = def.table;
        self.inferred = def.inferred;
        self.batch_interval_ms = def.batch_interval_ms;
        self.max_retries = def.max_retries;
        self.stop_on_error = def.stop_on_error;
        self.altered_ms = now_ms;
    }

    /// `connector.class` from CONFIG.
    pub fn connector_class(&self) -> Option<&str> {
        self.config.get("connector.class").and_then(Json::as_str)
    }

    fn task_mut(&mut self, task_id: u32) -> Result<&mut Task> {
        let name = self.name.clone();
        self.tasks
            .iter_mut()
            .find(|t| t.task_id == task_id)
            .ok_or(Error::TaskNotFound {
                pipeline: name,
                task: task_id,
            })
    }

    pub(super) fn start(
        &mut self,
        task_configs: Vec<BTreeMap<String, String>>,
        if_not_running: bool,
        now_ms: u64,
    ) -> Result<bool> {
        if self.state == PipelineState::Running {
            return if if_not_running {
                Ok(false)
            } else {
                Err(Error::PipelineRunning {
                    name: self.name.clone(),
                })
            };
        }
        if task_configs.is_empty() {
            return Err(Error::InvalidPipeline {
                name: self.name.clone(),
                reason: "the connector produced no tasks".into(),
            });
        }
        self.tasks = task_configs
            .into_iter()
            .enumerate()
            .map(|(i, config)| Task {
                task_id: i as u32,
                config,
                leaf: None,
                epoch: 0,
                committed: BTreeMap::new(),
            })
            .collect();
        self.state = PipelineState::Running;
        self.altered_ms = now_ms;
        self.start_ms.get_or_insert(now_ms);
        Ok(true)
    }

    pub(super) fn stop(&mut self, state: PipelineState, now_ms: u64) {
        self.state = state;
        self.tasks.clear();
        self.altered_ms = now_ms;
    }

    pub(super) fn assign(&mut self, task_id: u32, leaf: Option<LeafId>) -> Result<u64> {
        if self.state != PipelineState::Running {
            return Err(Error::PipelineNotRunning {
                name: self.name.clone(),
            });
        }
        let epoch = self.next_epoch;
        let task = self.task_mut(task_id)?;
        task.leaf = leaf;
        task.epoch = epoch;
        self.next_epoch += 1;
        Ok(epoch)
    }

    /// Fences an epoch: if it is still current, the task is unassigned (a new epoch follows).
    pub(super) fn fence(&mut self, task_id: u32, epoch: u64) -> bool {
        match self.tasks.iter_mut().find(|t| t.task_id == task_id) {
            Some(t) if t.epoch == epoch && epoch != 0 => {
                // Epoch 0 never commits: the task waits for a new assignment.
                t.leaf = None;
                t.epoch = 0;
                true
            }
            _ => false,
        }
    }

    /// Whether a batch is the last one its task committed in that epoch (a retried commit).
    /// Whether any batch committed is the catalog's to say (`Catalog::committed_batch`): it
    /// remembers every committed batch until its leaf made it visible.
    pub fn committed_batch(&self, task_id: u32, epoch: u64, seq: u64) -> Option<u64> {
        self.tasks
            .iter()
            .find(|t| t.task_id == task_id)
            .and_then(|t| t.committed.get(&epoch))
            .filter(|(last, _)| *last == seq)
            .map(|(_, batch_id)| *batch_id)
    }

    pub(super) fn commit(&mut self, b: BatchCommit, keep: usize) -> Result<u64> {
        if let Some(batch_id) = self.committed_batch(b.task_id, b.epoch, b.seq) {
            return Ok(batch_id); // a retried commit: same answer
        }
        if self.state != PipelineState::Running {
            return Err(Error::PipelineNotRunning {
                name: self.name.clone(),
            });
        }
        let name = self.name.clone();
        let current = self.task_mut(b.task_id)?.epoch;
        if current != b.epoch {
            return Err(Error::StaleEpoch {
                pipeline: name,
                task: b.task_id,
                epoch: b.epoch,
                current,
            });
        }
        for u in &b.offsets {
            let committed = self.offsets.get(&u.key).map(|o| &o.value);
            if committed != u.from.as_ref() {
                return Err(Error::OffsetConflict {
                    pipeline: name,
                    key: u.key.clone(),
                });
            }
        }
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        self.rows_loaded += b.rows;
        let continued: Vec<String> = b
            .offsets
            .iter()
            .filter(|u| u.from.is_none())
            .flat_map(|u| u.continues.iter().cloned())
            .collect();
        for u in b.offsets {
            self.offsets.insert(
                u.key,
                SourceOffset {
                    value: u.to,
                    task_id: b.task_id,
                    batch_id,
                    finished: u.finished,
                },
            );
        }
        // Ended partitions continued by one committed here (its parent ending in this batch
        // too, possibly) are forgotten: the tasks count a partition with a committed
        // descendant as ended.
        let mut retired = false;
        for ended in continued {
            if self.offsets.get(&ended).is_some_and(|o| o.finished) {
                self.offsets.remove(&ended);
                retired = true;
            }
        }
        if retired {
            // Leaves replace what they hold (a delta cannot say "forget").
            self.offsets_generation += 1;
        }
        let task = self.task_mut(b.task_id)?;
        task.committed.insert(b.epoch, (b.seq, batch_id));
        while task.committed.len() > EPOCHS_TO_KEEP {
            task.committed.pop_first();
        }
        self.batches.push_back(BatchSummary {
            batch_id,
            task_id: b.task_id,
            succeeded: true,
            start_ms: b.start_ms,
            extractor_wait_ms: b.extractor_wait_ms,
            batch_time_ms: b.batch_time_ms,
            rows: b.rows,
            bytes: b.bytes,
            num_partitions: b.num_partitions,
        });
        while self.batches.len() > keep.max(1) {
            self.batches.pop_front();
        }
        Ok(batch_id)
    }

    pub(super) fn record_error(&mut self, mut e: PipelineError) {
        e.error_id = self.next_error_id;
        self.next_error_id += 1;
        self.errors.push_back(e);
        while self.errors.len() > ERRORS_TO_KEEP {
            self.errors.pop_front();
        }
    }

    pub(super) fn alter(&mut self, change: PipelineChange, now_ms: u64) -> Result<()> {
        let needs_stop = matches!(
            change,
            PipelineChange::Offsets { .. }
                | PipelineChange::Config(_)
                | PipelineChange::Credentials(_)
        );
        if needs_stop && self.state == PipelineState::Running {
            return Err(Error::PipelineRunning {
                name: self.name.clone(),
            });
        }
        match change {
            PipelineChange::Offsets { start, offsets } => {
                self.offsets.clear();
                self.start_override = start;
                self.start_ms = None; // fixed again at the next START
                self.offsets_generation += 1;
                for (key, value) in offsets {
                    self.offsets.insert(
                        key,
                        SourceOffset {
                            value,
                            task_id: 0,
                            batch_id: 0,
                            finished: false,
                        },
                    );
                }
            }
            PipelineChange::BatchInterval(ms) => self.batch_interval_ms = Some(ms),
            PipelineChange::Config(c) => self.config = c,
            PipelineChange::Credentials(c) => self.credentials = c,
            PipelineChange::MaxRetries(n) => self.max_retries = Some(n),
            PipelineChange::StopOnError(b) => self.stop_on_error = Some(b),
        }
        self.altered_ms = now_ms;
        Ok(())
    }
}

/// Keys of CONFIG whose values are secrets (redacted wherever CONFIG is shown).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "secret",
        "password",
        "token",
        "access.key",
        "access_key",
        "credential",
        "private",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// CONFIG with secret values replaced.
pub fn redacted_config(config: &serde_json::Map<String, Json>) -> serde_json::Map<String, Json> {
    config
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_key(k) {
                Json::String("<redacted>".into())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Pipeline {
        let def = PipelineDef {
            database: "d".into(),
            name: "p".into(),
            connector: "kafka-connector".into(),
            config: serde_json::json!({"connector.class": "x", "aws.secret.access.key": "S"})
                .as_object()
                .cloned()
                .unwrap(),
            credentials: "{}".into(),
            table: "p".into(),
            inferred: true,
            batch_interval_ms: None,
            max_retries: None,
            stop_on_error: None,
        };
        let mut p = Pipeline::new(1, def, 0);
        p.start(vec![BTreeMap::new(), BTreeMap::new()], false, 1)
            .unwrap();
        p
    }

    fn batch(task_id: u32, epoch: u64, seq: u64, from: Option<&str>, to: &str) -> BatchCommit {
        BatchCommit {
            pipeline_id: 1,
            task_id,
            epoch,
            seq,
            offsets: vec![OffsetUpdate {
                key: r#"{"shardId":"s0"}"#.into(),
                from: from.map(|f| serde_json::json!({"sequenceNumber": f})),
                to: serde_json::json!({"sequenceNumber": to}),
                finished: false,
                continues: vec![],
            }],
            start_ms: 0,
            extractor_wait_ms: 0,
            batch_time_ms: 0,
            rows: 1,
            bytes: 1,
            num_partitions: 1,
        }
    }

    #[test]
    fn commits_are_fenced_by_epoch_and_offsets() {
        let mut p = pipeline();
        let e1 = p.assign(0, Some(LeafId(1))).unwrap();
        assert_eq!(p.commit(batch(0, e1, 1, None, "10"), 10).unwrap(), 1);
        // Retrying the same commit answers the same BATCH_ID and changes nothing.
        assert_eq!(p.commit(batch(0, e1, 1, None, "10"), 10).unwrap(), 1);
        assert_eq!(p.next_batch_id, 2);
        // A batch that read from an offset that is no longer committed is refused.
        assert!(matches!(
            p.commit(batch(0, e1, 2, Some("5"), "12"), 10),
            Err(Error::OffsetConflict { .. })
        ));
        // The task moves: the old epoch can no longer commit.
        let e2 = p.assign(0, Some(LeafId(2))).unwrap();
        assert!(e2 > e1);
        assert!(matches!(
            p.commit(batch(0, e1, 2, Some("10"), "12"), 10),
            Err(Error::StaleEpoch { .. })
        ));
        assert_eq!(p.commit(batch(0, e2, 1, Some("10"), "20"), 10).unwrap(), 2);
        assert_eq!(
            p.offsets[r#"{"shardId":"s0"}"#].value["sequenceNumber"],
            "20"
        );
        // A stopped pipeline commits nothing new.
        p.stop(PipelineState::Stopped, 5);
        assert!(matches!(
            p.commit(batch(0, e2, 2, Some("20"), "30"), 10),
            Err(Error::PipelineNotRunning { .. })
        ));
    }

    #[test]
    fn an_ended_partition_is_forgotten_once_a_partition_continuing_it_commits() {
        let mut p = pipeline();
        let e = p.assign(0, Some(LeafId(1))).unwrap();
        let update =
            |key: &str, from: Option<&str>, to: &str, finished, continues: &[&str]| OffsetUpdate {
                key: key.into(),
                from: from.map(|f| serde_json::json!({"sequenceNumber": f})),
                to: serde_json::json!({"sequenceNumber": to}),
                finished,
                continues: continues.iter().map(|c| c.to_string()).collect(),
            };
        let commit = |p: &mut Pipeline, seq, offsets| {
            let mut b = batch(0, e, seq, None, "");
            b.offsets = offsets;
            p.commit(b, 10).unwrap()
        };
        commit(&mut p, 1, vec![update("parent", None, "5", false, &[])]);
        let generation = p.offsets_generation;
        // A child of a parent that has not ended leaves it alone.
        commit(
            &mut p,
            2,
            vec![update("early", None, "1", false, &["parent"])],
        );
        assert!(p.offsets.contains_key("parent"));
        assert_eq!(p.offsets_generation, generation);
        // The parent ends and its child's first records commit in the same batch.
        commit(
            &mut p,
            3,
            vec![
                update("parent", Some("5"), "9", true, &[]),
                update("child", None, "10", false, &["parent"]),
            ],
        );
        assert!(!p.offsets.contains_key("parent"));
        assert!(p.offsets.contains_key("child"));
        // Leaves get the whole set again (a delta cannot say "forget").
        assert_eq!(p.offsets_generation, generation + 1);
        // Later commits of the child name no parents.
        commit(
            &mut p,
            4,
            vec![update("child", Some("10"), "11", false, &[])],
        );
        assert_eq!(p.offsets_generation, generation + 1);
    }

    #[test]
    fn only_the_last_batch_of_an_epoch_counts_as_a_retry() {
        let mut p = pipeline();
        let e = p.assign(0, Some(LeafId(1))).unwrap();
        assert_eq!(p.commit(batch(0, e, 5, None, "10"), 10).unwrap(), 1);
        // A different batch under an older sequence number is not "already committed": it
        // goes through the offset check like any other (and here fails it).
        assert!(matches!(
            p.commit(batch(0, e, 1, None, "3"), 10),
            Err(Error::OffsetConflict { .. })
        ));
        assert_eq!(p.committed_batch(0, e, 1), None);
        assert_eq!(p.committed_batch(0, e, 5), Some(1));
    }

    #[test]
    fn fencing_unassigns_only_the_current_epoch() {
        let mut p = pipeline();
        let e1 = p.assign(1, Some(LeafId(1))).unwrap();
        assert!(!p.fence(1, e1 + 7));
        assert!(p.fence(1, e1));
        assert_eq!(p.tasks[1].leaf, None);
        assert!(matches!(
            p.commit(batch(1, e1, 1, None, "1"), 10),
            Err(Error::StaleEpoch { .. })
        ));
    }

    #[test]
    fn history_is_bounded_and_secrets_redacted() {
        let mut p = pipeline();
        let e = p.assign(0, Some(LeafId(1))).unwrap();
        let mut from = None;
        for i in 0..20u64 {
            let to = i.to_string();
            p.commit(batch(0, e, i + 1, from.as_deref(), &to), 5)
                .unwrap();
            from = Some(to);
        }
        assert_eq!(p.batches.len(), 5);
        assert_eq!(p.batches.back().unwrap().batch_id, 20);
        let r = redacted_config(&p.config);
        assert_eq!(r["aws.secret.access.key"], "<redacted>");
        assert_eq!(r["connector.class"], "x");
    }
}

//! Polling a task's source for one batch.

use super::{now_ms, Assignment};
use crate::batch::{Outcome, RunError};
use common::connect;
use serde_json::Value as Json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Records taken from the source for one batch.
pub(super) struct Extracted {
    pub(super) records: Vec<connect::SourceRecord>,
    /// Source partitions that ended, with their last offset.
    pub(super) finished: Vec<(String, Json)>,
    pub(super) start: Instant,
    pub(super) start_ms: u64,
    pub(super) extract_ms: u64,
}

impl Extracted {
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty() && self.finished.is_empty()
    }
}

/// Polls the task for one batch: until `batch_size` records, until
/// `max_batch_interval_ms` elapsed, until a source partition ended, or, once it holds records,
/// until the source has nothing more to give right away or the batch before it (`loading`)
/// has been loaded and committed. A batch does not sit on rows it already has while the loader
/// is idle: under a slow source batches are what one poll brings and rows are visible a poll
/// after they are read; when loading is the slower side, batches grow up to `batch_size`.
/// `None` when cancelled.
pub(super) async fn extract(
    task: &mut dyn connect::SourceTask,
    a: &Assignment,
    metrics: &common::metrics::Metrics,
    cancel: &CancellationToken,
    loading: Option<&tokio::task::JoinHandle<Result<Outcome, RunError>>>,
) -> Result<Option<Extracted>, RunError> {
    let batch_size = a.batch_size.max(1) as usize;
    let start = Instant::now();
    let start_ms = now_ms();
    let deadline = start + Duration::from_millis(a.max_batch_interval_ms.max(1));
    let mut records = Vec::new();
    let mut finished = Vec::new();
    while records.len() < batch_size {
        // With records in hand, only what is available now.
        let until = if records.is_empty() {
            deadline
        } else {
            Instant::now().min(deadline)
        };
        let poll = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            p = task.poll(batch_size - records.len(), until) => p.map_err(|e| RunError::Failed(e.to_string()))?,
        };
        for (partition, ms) in &poll.lag_ms {
            metrics.set(
                &format!(
                    "shardline_source_lag_millis{{pipeline=\"{}\",partition=\"{}\"}}",
                    common::metrics::label(&a.pipeline),
                    common::metrics::label(partition)
                ),
                *ms as f64,
            );
        }
        let ended = !poll.finished.is_empty();
        let drained = !records.is_empty() && poll.records.is_empty();
        records.extend(poll.records);
        finished.extend(poll.finished);
        let loader_idle = !records.is_empty() && loading.is_none_or(|h| h.is_finished());
        if ended || drained || loader_idle || Instant::now() >= deadline {
            break;
        }
    }
    Ok(Some(Extracted {
        records,
        finished,
        start,
        start_ms,
        extract_ms: start.elapsed().as_millis() as u64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::runs;
    use common::connect::{
        avro, CommittedOffsets, ConnectorConfig, Poll, SourceRecord, SourceTask, TaskConfig,
    };

    /// A source that hands out `ready` records on its first poll and nothing after, noting
    /// each poll's deadline and when it was called.
    struct Scripted {
        ready: usize,
        /// Records one poll gives at most.
        chunk: usize,
        polls: Vec<(Instant, Instant)>,
    }

    #[async_trait::async_trait]
    impl SourceTask for Scripted {
        async fn start(
            &mut self,
            _: &ConnectorConfig,
            _: &TaskConfig,
            _: &CommittedOffsets,
        ) -> Result<(), connect::ConnectError> {
            Ok(())
        }

        async fn poll(
            &mut self,
            max_records: usize,
            deadline: Instant,
        ) -> Result<Poll, connect::ConnectError> {
            self.polls.push((Instant::now(), deadline));
            assert!(self.polls.len() < 10, "polled on after the source ran dry");
            let n = self.ready.min(max_records).min(self.chunk);
            self.ready -= n;
            let records = (0..n)
                .map(|i| SourceRecord {
                    topic: "t".into(),
                    key: avro::Value::Null,
                    value: avro::Value::Null,
                    source_partition: "p".into(),
                    source_offset: serde_json::json!(i),
                    size: 1,
                })
                .collect();
            Ok(Poll {
                records,
                ..Default::default()
            })
        }

        fn commit(&mut self, _: &CommittedOffsets) {}

        fn observe(&mut self, _: &CommittedOffsets) {}
    }

    fn assignment(batch_size: u64) -> Assignment {
        Assignment {
            batch_size,
            max_batch_interval_ms: 3_600_000,
            ..Default::default()
        }
    }

    type Loading = tokio::task::JoinHandle<Result<Outcome, RunError>>;

    /// A batch still loading (never done).
    fn busy_loader() -> Loading {
        tokio::spawn(std::future::pending())
    }

    /// A batch loaded and committed.
    async fn idle_loader() -> Loading {
        let h = tokio::spawn(async { Ok(Outcome::Continue) });
        while !h.is_finished() {
            tokio::task::yield_now().await;
        }
        h
    }

    /// One batch extracted from a source holding `ready` records, `chunk` at most per poll,
    /// beside `loading`, and the source after it.
    async fn extract_beside(
        ready: usize,
        chunk: usize,
        batch_size: u64,
        loading: Option<&Loading>,
    ) -> (Extracted, Scripted) {
        let mut task = Scripted {
            ready,
            chunk,
            polls: vec![],
        };
        let metrics = common::metrics::Metrics::default();
        let batch = extract(
            &mut task,
            &assignment(batch_size),
            &metrics,
            &CancellationToken::new(),
            loading,
        )
        .await
        .ok()
        .flatten()
        .expect("a batch");
        (batch, task)
    }

    /// One batch extracted from a source holding `ready` records while the batch before it is
    /// still loading, and the source after it.
    async fn extract_from(ready: usize, batch_size: u64) -> (Extracted, Scripted) {
        let loading = busy_loader();
        let out = extract_beside(ready, usize::MAX, batch_size, Some(&loading)).await;
        loading.abort();
        out
    }

    #[tokio::test]
    async fn with_the_loader_idle_a_batch_is_what_one_poll_brings() {
        for loading in [None, Some(idle_loader().await)] {
            let (batch, task) = extract_beside(100, 7, 50, loading.as_ref()).await;
            assert_eq!(batch.records.len(), 7, "the first poll's records, no more");
            assert_eq!(task.polls.len(), 1);
        }
    }

    #[tokio::test]
    async fn while_the_last_batch_loads_the_next_one_grows() {
        let loading = busy_loader();
        let (batch, task) = extract_beside(100, 7, 50, Some(&loading)).await;
        loading.abort();
        assert_eq!(batch.records.len(), 50, "polled on up to the batch size");
        assert_eq!(task.polls.len(), 8);
    }

    #[tokio::test]
    async fn a_batch_ends_once_the_source_has_nothing_more_right_now() {
        let (batch, task) = extract_from(3, 100).await;
        assert_eq!(batch.records.len(), 3);
        assert_eq!(
            task.polls.len(),
            2,
            "one poll that found records, one that found none"
        );
        let (called, deadline) = task.polls[1];
        assert!(
            deadline <= called,
            "with records in hand, the source is asked only for what it has now"
        );
    }

    #[tokio::test]
    async fn a_full_batch_ends_without_asking_for_more() {
        let (batch, task) = extract_from(10, 4).await;
        assert_eq!(batch.records.len(), 4);
        assert_eq!(task.polls.len(), 1);
    }

    #[test]
    fn records_split_into_equal_runs_over_the_partitions() {
        assert_eq!(runs(600, 2), (300, 2));
        assert_eq!(runs(8, 4), (2, 4));
        assert_eq!(
            runs(5, 4),
            (2, 3),
            "runs of 2: the fourth partition gets none"
        );
        assert_eq!(runs(1, 4), (1, 1));
        assert_eq!(runs(0, 4).1, 0);
    }
}

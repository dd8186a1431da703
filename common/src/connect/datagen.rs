//! A data generator connector for demos and benchmarks:
//! `io.shardline.connect.datagen.DatagenSourceConnector`.
//!
//! CONFIG: `kafka.topic` (default `datagen`), `tasks.max` (each task is one source partition
//! `{"task":i}`), `datagen.rate` (records per second per task, 0 = as fast as possible;
//! default 1000), `datagen.records` (records per task, then the partition ends; default
//! unbounded), `datagen.payload.bytes` (size of the `msg` field, default 32).
//! Records: key `{"seq":n}`, value `{"msg":"...","seq":n,"task":i}`; offset `{"seq":n}`.

use super::avro::canonical_json;
use super::{
    config_str, config_u64, CommittedOffsets, ConnectError, ConnectorConfig, Poll, SourceConnector,
    SourceRecord, SourceTask, TaskConfig,
};
use apache_avro::types::Value;
use apache_avro::Schema;
use async_trait::async_trait;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

/// The connector class name.
pub const CLASS: &str = "io.shardline.connect.datagen.DatagenSourceConnector";

const KEY_SCHEMA: &str =
    r#"{"type":"record","name":"DatagenKey","fields":[{"name":"seq","type":"long"}]}"#;
const VALUE_SCHEMA: &str = r#"{"type":"record","name":"DatagenValue","fields":[
  {"name":"msg","type":"string"},{"name":"seq","type":"long"},{"name":"task","type":"int"}]}"#;

pub struct DatagenConnector {
    key: Schema,
    value: Schema,
}

impl DatagenConnector {
    pub fn new() -> Self {
        Self {
            key: Schema::parse_str(KEY_SCHEMA).expect("static schema"),
            value: Schema::parse_str(VALUE_SCHEMA).expect("static schema"),
        }
    }
}

impl Default for DatagenConnector {
    fn default() -> Self {
        Self::new()
    }
}

struct Settings {
    topic: String,
    rate: u64,
    limit: Option<u64>,
    payload: usize,
}

fn settings(config: &ConnectorConfig) -> Result<Settings, ConnectError> {
    let limit = config_u64(config, "datagen.records", 0)?;
    let payload = config_u64(config, "datagen.payload.bytes", 32)?;
    if payload > 900_000 {
        return Err(ConnectError::Config(
            "datagen.payload.bytes must be at most 900000".into(),
        ));
    }
    Ok(Settings {
        topic: config_str(config, "kafka.topic").unwrap_or_else(|| "datagen".into()),
        rate: config_u64(config, "datagen.rate", 1000)?,
        limit: (limit > 0).then_some(limit),
        payload: payload as usize,
    })
}

#[async_trait]
impl SourceConnector for DatagenConnector {
    fn validate(&self, config: &ConnectorConfig) -> Result<(), ConnectError> {
        settings(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        _config: &ConnectorConfig,
        max_tasks: usize,
    ) -> Result<Vec<TaskConfig>, ConnectError> {
        Ok((0..max_tasks)
            .map(|i| TaskConfig::from([("task.id".to_string(), i.to_string())]))
            .collect())
    }

    fn task(&self) -> Box<dyn SourceTask> {
        Box::new(DatagenTask::default())
    }

    fn key_schema(&self) -> &Schema {
        &self.key
    }

    fn value_schema(&self) -> &Schema {
        &self.value
    }
}

#[derive(Default)]
struct DatagenTask {
    settings: Option<Settings>,
    task: u32,
    partition: String,
    next_seq: u64,
    started: Option<Instant>,
    emitted_since_start: u64,
    finished: bool,
    msg: String,
}

#[async_trait]
impl SourceTask for DatagenTask {
    async fn start(
        &mut self,
        config: &ConnectorConfig,
        task: &TaskConfig,
        offsets: &CommittedOffsets,
    ) -> Result<(), ConnectError> {
        let s = settings(config)?;
        let id: u32 = task
            .get("task.id")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ConnectError::Config("task config lacks 'task.id'".into()))?;
        let partition = canonical_json(&json!({ "task": id }));
        let next_seq = offsets
            .value(&partition)
            .and_then(|v| v.get("seq"))
            .and_then(Json::as_u64)
            .map_or(0, |s| s + 1);
        *self = DatagenTask {
            msg: "x".repeat(s.payload),
            // A partition ends at the configured count; a larger count (ALTER ... SET CONFIG)
            // reopens it.
            finished: s.limit.is_some_and(|l| next_seq >= l),
            settings: Some(s),
            task: id,
            partition,
            next_seq,
            started: Some(Instant::now()),
            emitted_since_start: 0,
        };
        Ok(())
    }

    async fn poll(&mut self, max_records: usize, deadline: Instant) -> Result<Poll, ConnectError> {
        let Some(s) = &self.settings else {
            return Err(ConnectError::Config("task not started".into()));
        };
        let mut poll = Poll::default();
        if self.finished {
            tokio::time::sleep_until(deadline.into()).await;
            return Ok(poll);
        }
        let mut n = max_records as u64;
        if let Some(limit) = s.limit {
            n = n.min(limit.saturating_sub(self.next_seq));
        }
        if s.rate > 0 {
            // Emit what the rate allows by now; wait (up to the deadline) for at least one.
            let started = self.started.unwrap_or_else(Instant::now);
            let allowed =
                |at: Instant| (at.duration_since(started).as_secs_f64() * s.rate as f64) as u64;
            let mut now = Instant::now();
            while allowed(now) <= self.emitted_since_start && now < deadline {
                let wait = Duration::from_secs_f64(1.0 / s.rate as f64).min(deadline - now);
                tokio::time::sleep(wait).await;
                now = Instant::now();
            }
            n = n.min(allowed(now).saturating_sub(self.emitted_since_start));
        }
        for _ in 0..n {
            let seq = self.next_seq as i64;
            poll.records.push(SourceRecord {
                topic: s.topic.clone(),
                key: Value::Record(vec![("seq".into(), Value::Long(seq))]),
                value: Value::Record(vec![
                    ("msg".into(), Value::String(self.msg.clone())),
                    ("seq".into(), Value::Long(seq)),
                    ("task".into(), Value::Int(self.task as i32)),
                ]),
                source_partition: self.partition.clone(),
                source_offset: json!({ "seq": seq }),
                size: self.msg.len() + 16,
            });
            self.next_seq += 1;
            self.emitted_since_start += 1;
        }
        if s.limit.is_some_and(|l| self.next_seq >= l) {
            self.finished = true;
            let last = self.next_seq.saturating_sub(1);
            poll.finished
                .push((self.partition.clone(), json!({ "seq": last })));
        }
        Ok(poll)
    }

    fn commit(&mut self, _offsets: &CommittedOffsets) {}

    fn observe(&mut self, _offsets: &CommittedOffsets) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resumes_after_the_committed_offset_and_ends_at_the_limit() {
        let c = DatagenConnector::new();
        let config = json!({"connector.class": CLASS, "datagen.rate": 0, "datagen.records": 10})
            .as_object()
            .cloned()
            .unwrap();
        c.validate(&config).unwrap();
        let tasks = c.task_configs(&config, 2).await.unwrap();
        assert_eq!(tasks.len(), 2);
        let mut offsets = CommittedOffsets::default();
        offsets
            .offsets
            .insert(r#"{"task":1}"#.into(), (json!({"seq": 6}), false));
        let mut t = c.task();
        t.start(&config, &tasks[1], &offsets).await.unwrap();
        let p = t.poll(100, Instant::now()).await.unwrap();
        let seqs: Vec<Json> = p
            .records
            .iter()
            .map(|r| r.source_offset["seq"].clone())
            .collect();
        assert_eq!(seqs, vec![json!(7), json!(8), json!(9)]);
        // Every record matches the connector's schemas (the Avro writer checks only a batch's
        // first record).
        for r in &p.records {
            assert!(r.key.validate(c.key_schema()), "key {:?}", r.key);
            assert!(r.value.validate(c.value_schema()), "value {:?}", r.value);
        }
        assert_eq!(
            p.finished,
            vec![(r#"{"task":1}"#.to_string(), json!({"seq": 9}))]
        );
    }
}

//! `com.singlestore.kafka.connect.kinesis.KinesisSourceConnector` on `aws-sdk-kinesis`.
//!
//! Shards are grouped over `min(tasks.max, open shards)` tasks by shard number. Each task
//! lists the stream's shards (and lists again to discover new ones; tasks of one leaf that list
//! within a second share one ListShards call), reads a parent shard to its end before its
//! children (lineage from ListShards; a parent owned by another task counts as ended once its
//! end is committed), resumes AFTER the committed sequence number, backs off on throttling, and
//! re-acquires expired iterators after the last record it read.

use super::avro::canonical_json;
use super::shared::SharedCalls;
use super::{
    config_str, config_u64, required, CommittedOffsets, ConnectError, ConnectorConfig, Poll,
    SourceConnector, SourceRecord, SourceTask, TaskConfig,
};
use apache_avro::types::Value;
use apache_avro::Schema;
use async_trait::async_trait;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// The connector class name.
pub const CLASS: &str = "com.singlestore.kafka.connect.kinesis.KinesisSourceConnector";

const KEY_SCHEMA: &str = r#"{"type":"record","name":"KinesisKey","namespace":"com.singlestore.kafka.connect.kinesis",
  "fields":[{"name":"partitionKey","type":"string"}]}"#;
const VALUE_SCHEMA: &str = r#"{"type":"record","name":"KinesisRecord","namespace":"com.singlestore.kafka.connect.kinesis",
  "fields":[{"name":"approximateArrivalTimestamp","type":"long"},{"name":"data","type":"bytes"},
            {"name":"partitionKey","type":"string"},{"name":"sequenceNumber","type":"string"},
            {"name":"shardId","type":"string"},{"name":"streamName","type":"string"}]}"#;

/// How often a task lists shards to discover new ones.
const LIST_INTERVAL: Duration = Duration::from_secs(5);

/// How old a listing another task of this process made may be and still serve a task's start
/// or periodic refresh (a listing after a parent shard ended is always new).
const SHARED_LISTING_WINDOW: Duration = Duration::from_secs(1);

type Shards = BTreeMap<String, ShardInfo>;

/// What a listing depends on: the stream, where and as whom it is asked, and the shard filter.
/// Held in memory only (never printed).
#[derive(PartialEq, Eq, Hash)]
struct ListingKey {
    endpoint: Option<String>,
    region: String,
    stream: String,
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    shard_filter: Option<String>,
}

/// The shard listings of this process, shared by the tasks (and the planning) of a pipeline
/// that list at about the same time.
static LISTINGS: std::sync::LazyLock<SharedCalls<ListingKey, Shards, ConnectError>> =
    std::sync::LazyLock::new(|| SharedCalls::new(SHARED_LISTING_WINDOW));

/// The stream's shards, and when the listing that gave them started: a new listing with
/// `fresh`, else possibly one another task made within [`SHARED_LISTING_WINDOW`].
async fn list_shards_shared(
    client: &Client,
    s: &Settings,
    fresh: bool,
) -> (Instant, Result<Shards, ConnectError>) {
    LISTINGS
        .get(s.listing_key(), fresh, || list_shards(client, s))
        .await
}

pub struct KinesisConnector {
    key: Schema,
    value: Schema,
}

impl KinesisConnector {
    pub fn new() -> Self {
        Self {
            key: Schema::parse_str(KEY_SCHEMA).expect("static schema"),
            value: Schema::parse_str(VALUE_SCHEMA).expect("static schema"),
        }
    }
}

impl Default for KinesisConnector {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Position {
    TrimHorizon,
    Latest,
    AtTimestamp(i64),
}

#[derive(Clone)]
struct Settings {
    stream: String,
    region: String,
    topic: String,
    /// From CONFIG/CREDENTIALS, else the leaf's AWS_* environment (checked when connecting).
    access_key: Option<String>,
    secret_key: Option<String>,
    session_token: Option<String>,
    endpoint: Option<String>,
    position: Position,
    record_limit: i32,
    empty_backoff: Duration,
    throughput_backoff: Duration,
    shard_filter: Option<regex::Regex>,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

impl Settings {
    fn parse(config: &ConnectorConfig) -> Result<Self, ConnectError> {
        let stream = required(config, "kinesis.stream")?;
        let region = config_str(config, "kinesis.region")
            .or_else(|| env_nonempty("AWS_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let topic = config_str(config, "kafka.topic").unwrap_or_else(|| stream.clone());
        let access_key =
            config_str(config, "aws.access.key.id").or_else(|| env_nonempty("AWS_ACCESS_KEY_ID"));
        let secret_key = config_str(config, "aws.secret.access.key")
            .or_else(|| env_nonempty("AWS_SECRET_ACCESS_KEY"));
        if config_str(config, "aws.access.key.id").is_some()
            && config_str(config, "aws.secret.access.key").is_none()
        {
            return Err(ConnectError::Config(
                "aws.access.key.id is set but aws.secret.access.key is missing".into(),
            ));
        }
        let session_token = config_str(config, "aws.session.token")
            .or_else(|| env_nonempty("AWS_SESSION_TOKEN"))
            .filter(|t| !t.trim().is_empty());
        let endpoint = config_str(config, "kinesis.endpoint").or_else(|| {
            if env_nonempty("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"))
            {
                return None;
            }
            env_nonempty("AWS_ENDPOINT_URL_KINESIS").or_else(|| env_nonempty("AWS_ENDPOINT_URL"))
        });
        let position = match config_str(config, "kinesis.position")
            .unwrap_or_else(|| "TRIM_HORIZON".into())
            .to_ascii_uppercase()
            .as_str()
        {
            "TRIM_HORIZON" => Position::TrimHorizon,
            "LATEST" => Position::Latest,
            "AT_TIMESTAMP" => {
                let ts = config_str(config, "kinesis.position.timestamp").ok_or_else(|| {
                    ConnectError::Config("kinesis.position AT_TIMESTAMP needs kinesis.position.timestamp (epoch milliseconds)".into())
                })?;
                Position::AtTimestamp(ts.trim().parse().map_err(|_| {
                    ConnectError::Config(format!(
                        "kinesis.position.timestamp must be epoch milliseconds, got '{ts}'"
                    ))
                })?)
            }
            other => {
                return Err(ConnectError::Config(format!(
                    "kinesis.position must be TRIM_HORIZON, LATEST or AT_TIMESTAMP, got '{other}'"
                )))
            }
        };
        let record_limit = config_u64(config, "kinesis.record.limit", 500)?;
        if !(1..=10_000).contains(&record_limit) {
            return Err(ConnectError::Config(format!(
                "kinesis.record.limit must be between 1 and 10000, got {record_limit}"
            )));
        }
        let shard_filter = match config_str(config, "kinesis.shard.id") {
            Some(p) if !p.trim().is_empty() => Some(regex::Regex::new(&p).map_err(|e| {
                ConnectError::Config(format!("kinesis.shard.id is not a valid regex: {e}"))
            })?),
            _ => None,
        };
        Ok(Settings {
            stream,
            region,
            topic,
            access_key,
            secret_key,
            session_token,
            endpoint,
            position,
            record_limit: record_limit as i32,
            empty_backoff: Duration::from_millis(config_u64(
                config,
                "kinesis.empty.records.backoff.ms",
                200,
            )?),
            throughput_backoff: Duration::from_millis(config_u64(
                config,
                "kinesis.throughput.exceeded.backoff.ms",
                1000,
            )?),
            shard_filter,
        })
    }

    fn client(&self) -> Result<Client, ConnectError> {
        let (Some(access), Some(secret)) = (&self.access_key, &self.secret_key) else {
            return Err(ConnectError::Config(
                "no AWS credentials: set aws.access.key.id and aws.secret.access.key in CONFIG or CREDENTIALS (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY on the leaves)".into(),
            ));
        };
        Ok(sdk_client(
            self.endpoint.as_deref(),
            &self.region,
            access,
            secret,
            self.session_token.clone(),
        ))
    }

    fn listing_key(&self) -> ListingKey {
        ListingKey {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            stream: self.stream.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
            session_token: self.session_token.clone(),
            shard_filter: self.shard_filter.as_ref().map(|r| r.as_str().to_string()),
        }
    }

    fn where_(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("stream '{}' at {e}", self.stream),
            None => format!("stream '{}' in {}", self.stream, self.region),
        }
    }
}

/// An `aws-sdk-kinesis` client with static credentials, one attempt per call and short
/// connect timeouts (our own loops retry). Reads no AWS config files.
pub fn sdk_client(
    endpoint: Option<&str>,
    region: &str,
    access_key: &str,
    secret_key: &str,
    session_token: Option<String>,
) -> Client {
    {
        use aws_sdk_kinesis::config::retry::RetryConfig;
        use aws_sdk_kinesis::config::timeout::TimeoutConfig;
        let creds = Credentials::new(
            access_key,
            secret_key,
            session_token,
            None,
            "pipeline-config",
        );
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut b = aws_sdk_kinesis::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .credentials_provider(creds)
            .http_client(http)
            // Retries are ours (backoff on throttling, batch retries): one attempt per call.
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_timeout(Duration::from_secs(15))
                    .build(),
            );
        if let Some(url) = endpoint {
            b = b.endpoint_url(url.to_string());
        }
        Client::from_conf(b.build())
    }
}

/// An error and its causes on one line, without Debug dumps (no request details, no keys).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = s.source();
    }
    out
}

/// Classifies an SDK error: (code, one-line message).
fn describe<E, R>(e: &SdkError<E, R>) -> (Option<String>, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().map(String::from);
            let msg = err
                .message()
                .map(String::from)
                .unwrap_or_else(|| chain(err));
            (
                code.clone(),
                format!("{}: {msg}", code.unwrap_or_else(|| "service error".into())),
            )
        }
        other => (None, chain(other)),
    }
}

#[derive(Debug, Clone)]
struct ShardInfo {
    parent: Option<String>,
    adjacent: Option<String>,
    starting: String,
    ending: Option<String>,
}

async fn list_shards(client: &Client, s: &Settings) -> Result<Shards, ConnectError> {
    tracing::debug!(stream = %s.stream, "ListShards");
    let mut out = BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(&s.stream),
        };
        let resp = req.send().await.map_err(|e| {
            let (code, msg) = describe(&e);
            match code.as_deref() {
                Some("ResourceNotFoundException") => {
                    ConnectError::Config(format!("Kinesis {} does not exist", s.where_()))
                }
                Some(
                    "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "InvalidSignatureException",
                ) => ConnectError::Config(format!(
                    "Kinesis refused the credentials for {}: {msg}",
                    s.where_()
                )),
                _ => ConnectError::Source(format!(
                    "cannot list shards of Kinesis {}: {msg}",
                    s.where_()
                )),
            }
        })?;
        for shard in resp.shards() {
            let id = shard.shard_id().to_string();
            if s.shard_filter.as_ref().is_some_and(|r| !r.is_match(&id)) {
                continue;
            }
            let range = shard.sequence_number_range();
            out.insert(
                id,
                ShardInfo {
                    parent: shard.parent_shard_id().map(String::from),
                    adjacent: shard.adjacent_parent_shard_id().map(String::from),
                    starting: range
                        .map(|r| r.starting_sequence_number().to_string())
                        .unwrap_or_default(),
                    ending: range
                        .and_then(|r| r.ending_sequence_number())
                        .map(String::from),
                },
            );
        }
        token = resp.next_token().map(String::from);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// The task a shard belongs to: its number modulo the task count (hash if unnumbered).
fn task_of(shard_id: &str, task_count: u64) -> u64 {
    let digits: String = shard_id
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    let n = digits
        .chars()
        .rev()
        .collect::<String>()
        .parse::<u64>()
        .unwrap_or_else(|_| {
            shard_id.bytes().fold(1469598103934665603u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(1099511628211)
            })
        });
    n % task_count.max(1)
}

/// Compares Kinesis sequence numbers (decimal strings of up to 128 bits).
fn seq_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// The source partition key of a shard.
pub fn partition_key(shard_id: &str) -> String {
    canonical_json(&json!({ "shardId": shard_id }))
}

fn offset_value(seq: &str) -> Json {
    json!({ "sequenceNumber": seq })
}

fn offset_seq(v: &Json) -> Option<String> {
    v.get("sequenceNumber")
        .and_then(Json::as_str)
        .map(String::from)
}

/// A Kinesis record as a source record (KinesisKey, KinesisRecord), and its sequence number.
fn source_record(
    s: &Settings,
    shard: &str,
    partition: &str,
    r: aws_sdk_kinesis::types::Record,
) -> (SourceRecord, String) {
    let seq = r.sequence_number;
    let pk = r.partition_key.unwrap_or_default();
    let arrival = r
        .approximate_arrival_timestamp
        .and_then(|t| t.to_millis().ok())
        .unwrap_or(0);
    let data = r.data.into_inner();
    let size = data.len() + pk.len();
    let record = SourceRecord {
        topic: s.topic.clone(),
        key: Value::Record(vec![("partitionKey".into(), Value::String(pk.clone()))]),
        value: Value::Record(vec![
            ("approximateArrivalTimestamp".into(), Value::Long(arrival)),
            ("data".into(), Value::Bytes(data)),
            ("partitionKey".into(), Value::String(pk)),
            ("sequenceNumber".into(), Value::String(seq.clone())),
            ("shardId".into(), Value::String(shard.to_string())),
            ("streamName".into(), Value::String(s.stream.clone())),
        ]),
        source_partition: partition.to_string(),
        source_offset: offset_value(&seq),
        size,
    };
    (record, seq)
}

#[async_trait]
impl SourceConnector for KinesisConnector {
    fn validate(&self, config: &ConnectorConfig) -> Result<(), ConnectError> {
        Settings::parse(config).map(|_| ())
    }

    async fn task_configs(
        &self,
        config: &ConnectorConfig,
        max_tasks: usize,
    ) -> Result<Vec<TaskConfig>, ConnectError> {
        let s = Settings::parse(config)?;
        // The tasks starting on this leaf right after may share this listing.
        let shards = list_shards_shared(&s.client()?, &s, true).await.1?;
        let open = shards.values().filter(|i| i.ending.is_none()).count();
        let count = max_tasks.min(open).max(1);
        Ok((0..count)
            .map(|i| {
                TaskConfig::from([
                    ("task.id".to_string(), i.to_string()),
                    ("task.count".to_string(), count.to_string()),
                ])
            })
            .collect())
    }

    fn task(&self) -> Box<dyn SourceTask> {
        Box::new(KinesisTask::default())
    }

    fn key_schema(&self) -> &Schema {
        &self.key
    }

    fn value_schema(&self) -> &Schema {
        &self.value
    }
}

#[derive(Default)]
struct ShardReader {
    iterator: Option<String>,
    /// Last sequence number handed out (maybe not yet committed).
    last_seq: Option<String>,
    backoff_until: Option<Instant>,
    finished: bool,
}

#[derive(Default)]
struct KinesisTask {
    settings: Option<Settings>,
    client: Option<Client>,
    task_id: u64,
    task_count: u64,
    shards: Shards,
    /// Shards seen by the first listing: they start at the configured position.
    initial: Option<BTreeSet<String>>,
    readers: BTreeMap<String, ShardReader>,
    committed: CommittedOffsets,
    /// Each listed shard's children (the shards naming it as parent or adjacent parent).
    children: BTreeMap<String, Vec<String>>,
    listed_at: Option<Instant>,
    cursor: usize,
}

impl KinesisTask {
    fn parents_done(&self, info: &ShardInfo) -> bool {
        [&info.parent, &info.adjacent]
            .into_iter()
            .flatten()
            .all(|p| !self.shards.contains_key(p) || self.done(p))
    }

    /// Whether a shard has been read to its end: its committed offset says so, its reader
    /// ended here, or a shard descended from it has a committed offset (a child is read only
    /// once its parents ended, and the catalog forgets an ended shard's offset once a child of
    /// it commits).
    fn done(&self, shard: &str) -> bool {
        if self.committed.finished(&partition_key(shard))
            || self.readers.get(shard).is_some_and(|r| r.finished)
        {
            return true;
        }
        let mut stack = vec![shard];
        let mut seen = BTreeSet::new();
        while let Some(s) = stack.pop() {
            for child in self.children.get(s).into_iter().flatten() {
                if !seen.insert(child.as_str()) {
                    continue;
                }
                if self.committed.value(&partition_key(child)).is_some() {
                    return true;
                }
                stack.push(child);
            }
        }
        false
    }

    fn index_children(&mut self) {
        self.children.clear();
        for (id, info) in &self.shards {
            for parent in [&info.parent, &info.adjacent].into_iter().flatten() {
                self.children
                    .entry(parent.clone())
                    .or_default()
                    .push(id.clone());
            }
        }
    }

    fn owned(&self) -> Vec<String> {
        self.shards
            .iter()
            .filter(|(id, _)| task_of(id, self.task_count) == self.task_id)
            .filter(|(id, _)| !self.done(id))
            .filter(|(_, info)| self.parents_done(info))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Lists the shards again: a new listing with `fresh`, else maybe one shared with the
    /// other tasks of this leaf.
    async fn refresh(&mut self, fresh: bool) -> Result<(), ConnectError> {
        let (Some(s), Some(client)) = (&self.settings, &self.client) else {
            return Err(ConnectError::Config("task not started".into()));
        };
        let (listed_at, shards) = list_shards_shared(client, s, fresh).await;
        self.shards = shards?;
        self.index_children();
        if self.initial.is_none() {
            self.initial = Some(self.shards.keys().cloned().collect());
        }
        self.listed_at = Some(listed_at);
        Ok(())
    }

    /// Gets an iterator for a shard, or marks it finished (LATEST on a closed shard).
    async fn acquire(&mut self, shard: &str) -> Result<(), ConnectError> {
        let (Some(s), Some(client)) = (self.settings.clone(), self.client.clone()) else {
            return Err(ConnectError::Config("task not started".into()));
        };
        let key = partition_key(shard);
        let info = self.shards.get(shard).cloned();
        let reader = self.readers.entry(shard.to_string()).or_default();
        let after = reader
            .last_seq
            .clone()
            .or_else(|| self.committed.value(&key).and_then(offset_seq));
        let initial = self.initial.as_ref().is_some_and(|i| i.contains(shard));
        let position = match self.committed.start_override.as_deref() {
            Some("latest") => Position::Latest,
            Some("earliest") => Position::TrimHorizon,
            _ => s.position,
        };
        // "Latest" as of the moment the catalog fixed the pipeline's start: the same position
        // however often the task restarts before its first commit. (Records are matched by
        // their arrival time at Kinesis against the master's clock: skew between the two
        // moves the start by as much.)
        let position = match (position, self.committed.start_at_ms) {
            (Position::Latest, Some(ms)) => Position::AtTimestamp(ms as i64),
            (p, _) => p,
        };
        let mut req = client
            .get_shard_iterator()
            .stream_name(&s.stream)
            .shard_id(shard);
        req = match (&after, initial, position) {
            (Some(seq), _, _) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(seq),
            // Shards that appear while running are read whole, after their parents.
            (None, false, _) | (None, true, Position::TrimHorizon) => {
                req.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            (None, true, Position::Latest) => {
                if let Some(ending) = info.as_ref().and_then(|i| i.ending.clone()) {
                    // Closed before we started at LATEST: nothing of it is ours to read.
                    reader.finished = true;
                    reader.last_seq = Some(ending);
                    return Ok(());
                }
                req.shard_iterator_type(ShardIteratorType::Latest)
            }
            (None, true, Position::AtTimestamp(ms)) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(ms)),
        };
        match req.send().await {
            Ok(out) => {
                let reader = self.readers.entry(shard.to_string()).or_default();
                reader.iterator = out.shard_iterator().map(String::from);
                if reader.iterator.is_none() {
                    reader.finished = true;
                }
                Ok(())
            }
            Err(e) => {
                let (code, msg) = describe(&e);
                match code.as_deref() {
                    Some("ProvisionedThroughputExceededException" | "LimitExceededException") => {
                        let reader = self.readers.entry(shard.to_string()).or_default();
                        reader.backoff_until = Some(Instant::now() + s.throughput_backoff);
                        Ok(())
                    }
                    Some("ResourceNotFoundException") => Err(ConnectError::Source(format!(
                        "Kinesis {} or its shard {shard} no longer exists",
                        s.where_()
                    ))),
                    _ => Err(ConnectError::Source(format!(
                        "cannot get a shard iterator for {shard} of Kinesis {}: {msg}",
                        s.where_()
                    ))),
                }
            }
        }
    }

    /// Reads once from a shard into `poll`.
    async fn read(
        &mut self,
        shard: &str,
        limit: usize,
        poll: &mut Poll,
    ) -> Result<(), ConnectError> {
        let (Some(s), Some(client)) = (self.settings.clone(), self.client.clone()) else {
            return Err(ConnectError::Config("task not started".into()));
        };
        let Some(iterator) = self.readers.get(shard).and_then(|r| r.iterator.clone()) else {
            return Ok(());
        };
        let limit = limit.min(s.record_limit as usize).max(1) as i32;
        let asked = Instant::now();
        let result = client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await;
        let ending = self.shards.get(shard).and_then(|i| i.ending.clone());
        let starting = self.shards.get(shard).map(|i| i.starting.clone());
        let key = partition_key(shard);
        let committed_seq = self.committed.value(&key).and_then(offset_seq);
        let reader = self.readers.entry(shard.to_string()).or_default();
        match result {
            Ok(out) => {
                let got = out.records().len();
                tracing::trace!(
                    shard,
                    got,
                    ms = asked.elapsed().as_secs_f64() * 1000.0,
                    "GetRecords"
                );
                if let Some(ms) = out.millis_behind_latest {
                    poll.lag_ms.push((shard.to_string(), ms.max(0) as u64));
                }
                for r in out.records {
                    let (record, seq) = source_record(&s, shard, &key, r);
                    reader.last_seq = Some(seq);
                    poll.records.push(record);
                }
                reader.iterator = out.next_shard_iterator.clone();
                let last = reader.last_seq.clone().or(committed_seq);
                // The end of a closed shard: Kinesis says so with a null iterator; emulators
                // that never do are caught by the shard's ending sequence number (ListShards),
                // once a record at or past it was read. An empty page alone says nothing: AWS
                // may answer so before a shard's data, closed or not.
                let at_end = reader.iterator.is_none()
                    || (got == 0
                        && ending.as_ref().is_some_and(|end| {
                            last.as_ref()
                                .is_some_and(|l| seq_cmp(l, end) != std::cmp::Ordering::Less)
                        }));
                if at_end {
                    reader.finished = true;
                    reader.iterator = None;
                    let value = last.or(ending).or(starting).unwrap_or_default();
                    poll.finished.push((key, offset_value(&value)));
                } else if got == 0 || (got < limit as usize && out.millis_behind_latest == Some(0))
                {
                    // Nothing, or the shard's newest records: nothing more to read right now.
                    reader.backoff_until = Some(Instant::now() + s.empty_backoff);
                }
                Ok(())
            }
            Err(e) => {
                let (code, msg) = describe(&e);
                match code.as_deref() {
                    Some(
                        "ProvisionedThroughputExceededException"
                        | "KMSThrottlingException"
                        | "LimitExceededException",
                    ) => {
                        tracing::debug!(shard, "throttled by Kinesis; backing off");
                        reader.backoff_until = Some(Instant::now() + s.throughput_backoff);
                        Ok(())
                    }
                    Some("ExpiredIteratorException") => {
                        // Re-acquired after the last record read (== committed when idle).
                        reader.iterator = None;
                        Ok(())
                    }
                    Some("ResourceNotFoundException") => Err(ConnectError::Source(format!(
                        "Kinesis {} no longer exists",
                        s.where_()
                    ))),
                    _ => Err(ConnectError::Source(format!(
                        "cannot read shard {shard} of Kinesis {}: {msg}",
                        s.where_()
                    ))),
                }
            }
        }
    }
}

#[async_trait]
impl SourceTask for KinesisTask {
    async fn start(
        &mut self,
        config: &ConnectorConfig,
        task: &TaskConfig,
        offsets: &CommittedOffsets,
    ) -> Result<(), ConnectError> {
        let s = Settings::parse(config)?;
        let num = |k: &str| -> Result<u64, ConnectError> {
            task.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| ConnectError::Config(format!("task config lacks '{k}'")))
        };
        *self = KinesisTask {
            task_id: num("task.id")?,
            task_count: num("task.count")?,
            client: Some(s.client()?),
            settings: Some(s),
            committed: offsets.clone(),
            ..Default::default()
        };
        self.refresh(false).await
    }

    async fn poll(&mut self, max_records: usize, deadline: Instant) -> Result<Poll, ConnectError> {
        let mut poll = Poll::default();
        loop {
            match self.listed_at {
                // After a parent shard ended: its children must be in the listing.
                None => self.refresh(true).await?,
                Some(t) if t.elapsed() >= LIST_INTERVAL => self.refresh(false).await?,
                Some(_) => {}
            }
            let owned = self.owned();
            let now = Instant::now();
            let mut next_wake = deadline;
            for i in 0..owned.len() {
                let shard = &owned[(self.cursor + i) % owned.len()];
                if let Some(until) = self.readers.get(shard).and_then(|r| r.backoff_until) {
                    if until > now {
                        next_wake = next_wake.min(until);
                        continue;
                    }
                }
                if self.readers.get(shard).is_none_or(|r| r.iterator.is_none()) {
                    self.acquire(shard).await?;
                    if self.readers.get(shard).is_some_and(|r| r.finished) {
                        let value = self.readers[shard].last_seq.clone().unwrap_or_default();
                        poll.finished
                            .push((partition_key(shard), offset_value(&value)));
                        continue;
                    }
                }
                let room = max_records.saturating_sub(poll.records.len());
                if room == 0 {
                    break;
                }
                self.read(shard, room, &mut poll).await?;
                if let Some(until) = self.readers.get(shard).and_then(|r| r.backoff_until) {
                    next_wake = next_wake.min(until);
                }
            }
            self.cursor = self.cursor.wrapping_add(1);
            let ended_parent = !poll.finished.is_empty();
            if !poll.records.is_empty() && !ended_parent {
                return Ok(poll);
            }
            if ended_parent {
                // Children of a shard that just ended may be readable now: list again.
                self.listed_at = None;
                if !poll.records.is_empty() || Instant::now() >= deadline {
                    return Ok(poll);
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(poll);
            }
            let wake = next_wake.min(deadline).max(now + Duration::from_millis(10));
            tokio::time::sleep_until(wake.into()).await;
        }
    }

    fn commit(&mut self, offsets: &CommittedOffsets) {
        self.committed = offsets.clone();
    }

    fn continues(&self, partition: &str) -> Vec<String> {
        let shard = serde_json::from_str::<Json>(partition)
            .ok()
            .and_then(|k| k.get("shardId")?.as_str().map(String::from));
        let Some(info) = shard.and_then(|id| self.shards.get(&id)) else {
            return Vec::new();
        };
        [&info.parent, &info.adjacent]
            .into_iter()
            .flatten()
            .map(|p| partition_key(p))
            .collect()
    }

    fn observe(&mut self, offsets: &CommittedOffsets) {
        // Keep our own uncommitted progress; learn other tasks' ends.
        for (k, (v, finished)) in &offsets.offsets {
            let e = self
                .committed
                .offsets
                .entry(k.clone())
                .or_insert((v.clone(), *finished));
            if *finished {
                *e = (v.clone(), true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: Json) -> ConnectorConfig {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn records_match_the_connector_schemas() {
        let c = KinesisConnector::new();
        let s = Settings::parse(&cfg(json!({
            "connector.class": CLASS, "kinesis.stream": "s", "kafka.topic": "t",
        })))
        .unwrap();
        let r = aws_sdk_kinesis::types::Record::builder()
            .sequence_number("49590338271490256608559692538361571095921575989136588898")
            .partition_key("user-1")
            .data(aws_sdk_kinesis::primitives::Blob::new(
                b"{\"a\":1}".to_vec(),
            ))
            .approximate_arrival_timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(7))
            .build()
            .unwrap();
        let key = partition_key("shardId-000000000001");
        let (record, seq) = source_record(&s, "shardId-000000000001", &key, r);
        assert_eq!(
            seq,
            "49590338271490256608559692538361571095921575989136588898"
        );
        assert!(record.key.validate(c.key_schema()), "{:?}", record.key);
        assert!(
            record.value.validate(c.value_schema()),
            "{:?}",
            record.value
        );
        assert_eq!(record.source_partition, key);
        assert_eq!(record.source_offset, offset_value(&seq));
        assert_eq!(record.topic, "t");
    }

    #[test]
    fn settings_validate_the_spec_config() {
        let c = cfg(json!({
            "connector.class": CLASS,
            "aws.access.key.id": "<aws_access_key>",
            "aws.secret.access.key": "<aws_secret_key>",
            "aws.session.token": "<aws_session_token>",
            "kafka.topic": "kinesis-topic",
            "kinesis.stream": "my-kinesis-stream",
            "kinesis.region": "us-east-1",
            "tasks.max": 4
        }));
        let s = Settings::parse(&c).unwrap();
        assert_eq!(s.topic, "kinesis-topic");
        assert_eq!(s.position, Position::TrimHorizon);
        let mut bad = c.clone();
        bad.remove("kinesis.stream");
        assert!(Settings::parse(&bad)
            .err()
            .is_some_and(|e| e.to_string().contains("kinesis.stream")));
        let mut bad = c.clone();
        bad.insert("kinesis.position".into(), json!("SOMETIME"));
        assert!(Settings::parse(&bad).is_err());
        let mut bad = c;
        bad.insert("kinesis.record.limit".into(), json!(20000));
        assert!(Settings::parse(&bad).is_err());
    }

    #[test]
    fn shards_spread_by_number() {
        assert_eq!(task_of("shardId-000000000000", 4), 0);
        assert_eq!(task_of("shardId-000000000005", 4), 1);
        assert!(task_of("weird", 3) < 3);
        assert_eq!(seq_cmp("9", "10"), std::cmp::Ordering::Less);
        assert_eq!(
            partition_key("shardId-000000000000"),
            r#"{"shardId":"shardId-000000000000"}"#
        );
    }

    fn shard(parent: Option<&str>, adjacent: Option<&str>, ending: Option<&str>) -> ShardInfo {
        ShardInfo {
            parent: parent.map(String::from),
            adjacent: adjacent.map(String::from),
            starting: "0".into(),
            ending: ending.map(String::from),
        }
    }

    #[test]
    fn a_shard_whose_offset_was_forgotten_for_a_descendant_stays_ended() {
        // 0 split into 2 and 3; 2 and 3 merged into 4; 4 committed, so the catalog forgot
        // the offsets of 0, 2 and 3.
        let mut t = KinesisTask {
            task_id: 0,
            task_count: 1,
            ..Default::default()
        };
        let id = |n: u32| format!("shardId-{n:012}");
        t.shards.insert(id(0), shard(None, None, Some("9")));
        t.shards.insert(id(1), shard(None, None, None));
        t.shards.insert(id(2), shard(Some(&id(0)), None, Some("5")));
        t.shards.insert(id(3), shard(Some(&id(0)), None, Some("6")));
        t.shards
            .insert(id(4), shard(Some(&id(2)), Some(&id(3)), None));
        t.index_children();
        t.committed
            .offsets
            .insert(partition_key(&id(4)), (offset_value("7"), false));
        assert_eq!(t.owned(), vec![id(1), id(4)]);
        assert_eq!(
            t.continues(&partition_key(&id(4))),
            vec![partition_key(&id(2)), partition_key(&id(3))]
        );
        assert!(t.continues(&partition_key(&id(1))).is_empty());
        assert!(t.continues("not a key").is_empty());
    }

    #[test]
    fn parents_are_read_to_their_end_before_children() {
        // 0 split into 2 and 3; 2 and 3 merged into 4. One task owns everything.
        let mut t = KinesisTask {
            task_id: 0,
            task_count: 1,
            ..Default::default()
        };
        t.shards
            .insert("shardId-000000000000".into(), shard(None, None, Some("9")));
        t.shards
            .insert("shardId-000000000001".into(), shard(None, None, None));
        t.shards.insert(
            "shardId-000000000002".into(),
            shard(Some("shardId-000000000000"), None, Some("5")),
        );
        t.shards.insert(
            "shardId-000000000003".into(),
            shard(Some("shardId-000000000000"), None, Some("6")),
        );
        t.shards.insert(
            "shardId-000000000004".into(),
            shard(
                Some("shardId-000000000002"),
                Some("shardId-000000000003"),
                None,
            ),
        );
        assert_eq!(
            t.owned(),
            vec!["shardId-000000000000", "shardId-000000000001"]
        );
        // The parent ended (committed by whichever task read it): its children open.
        t.committed.offsets.insert(
            partition_key("shardId-000000000000"),
            (json!({"sequenceNumber": "9"}), true),
        );
        assert_eq!(
            t.owned(),
            vec![
                "shardId-000000000001",
                "shardId-000000000002",
                "shardId-000000000003"
            ]
        );
        // A merge waits for both parents; one ended locally (same batch) counts.
        t.committed.offsets.insert(
            partition_key("shardId-000000000002"),
            (json!({"sequenceNumber": "5"}), true),
        );
        assert!(!t.owned().contains(&"shardId-000000000004".to_string()));
        t.readers
            .entry("shardId-000000000003".into())
            .or_default()
            .finished = true;
        assert_eq!(
            t.owned(),
            vec!["shardId-000000000001", "shardId-000000000004"]
        );
        // Another task's shards are not ours.
        t.task_count = 2;
        assert_eq!(t.owned(), vec!["shardId-000000000004"]);
    }
}

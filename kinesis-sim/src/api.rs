//! Kinesis's JSON 1.1 API over the model: `POST /` with `X-Amz-Target: Kinesis_20131202.<Op>`.

use crate::model::{parse_seq, seq, ApiError, Limits, Result, State, Stream, MAX_RECORD_BYTES};
use base64::Engine as _;
use serde_json::{json, Value as Json};
use std::sync::Mutex;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Fault injection knobs.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Extra latency per call.
    pub latency_ms: u64,
    /// Fraction of GetRecords calls answered with ProvisionedThroughputExceeded.
    pub throttle_rate: f64,
    /// Fraction of calls answered with a 500 InternalFailure.
    pub error_rate: f64,
    /// The operations `error_rate` applies to (all when empty).
    pub error_ops: Vec<String>,
    /// Reads of each shard answered with an empty page first (AWS may do so before data).
    pub empty_pages: u32,
}

pub struct Api {
    pub state: Mutex<State>,
    pub limits: Limits,
    pub faults: Faults,
    /// Journal of every change (optional persistence), replayed at start.
    journal: Option<Mutex<std::io::BufWriter<std::fs::File>>>,
    /// Empty pages served so far per (stream, shard) ([`Faults::empty_pages`]).
    empty_served: Mutex<std::collections::HashMap<(String, String), u32>>,
}

/// Applies one journal entry to the state (start-up replay).
fn replay(st: &mut State, e: &Json) -> std::result::Result<(), String> {
    let s = |k: &str| {
        e.get(k)
            .and_then(Json::as_str)
            .map(String::from)
            .ok_or_else(|| format!("journal entry lacks {k}"))
    };
    let n = |k: &str| {
        e.get(k)
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("journal entry lacks {k}"))
    };
    let stream = |st: &mut State, name: &str| st.stream(name).map_err(|e| e.message).map(|_| ());
    match e.get("op").and_then(Json::as_str) {
        Some("create") => {
            let name = s("name")?;
            st.generation += 1;
            let g = st.generation;
            st.streams.insert(
                name.clone(),
                Stream::new(&name, n("count")? as usize, n("now")?, g),
            );
        }
        Some("delete") => {
            st.streams.remove(&s("name")?);
        }
        Some("put") => {
            let name = s("stream")?;
            stream(st, &name)?;
            let data = b64().decode(s("data")?).map_err(|e| e.to_string())?;
            let shard = n("shard")? as usize;
            let now = n("now")?;
            let pk = s("pk")?;
            if let Ok(x) = st.stream(&name) {
                if shard >= x.shards.len() {
                    return Err("journal names a missing shard".into());
                }
                x.append(shard, &pk, data, now);
            }
        }
        Some("split") => {
            let name = s("stream")?;
            st.stream(&name)
                .map_err(|e| e.message)?
                .split(&s("shard")?, &s("key")?)
                .map_err(|e| e.message)?;
        }
        Some("merge") => {
            let name = s("stream")?;
            st.stream(&name)
                .map_err(|e| e.message)?
                .merge(&s("a")?, &s("b")?)
                .map_err(|e| e.message)?;
        }
        Some("scale") => {
            let name = s("stream")?;
            st.stream(&name)
                .map_err(|e| e.message)?
                .update_shard_count(n("target")? as usize)
                .map_err(|e| e.message)?;
        }
        Some("retention") => {
            let name = s("stream")?;
            st.stream(&name).map_err(|e| e.message)?.retention_hours = n("hours")? as u32;
        }
        other => return Err(format!("unknown journal entry {other:?}")),
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds on a monotonic clock (since the first call), for the per-second rate limits:
/// a step of the wall clock must not open or close a window.
fn rate_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn str_arg<'a>(req: &'a Json, key: &str) -> Result<&'a str> {
    req.get(key)
        .and_then(Json::as_str)
        .ok_or_else(|| ApiError::new("ValidationException", format!("1 validation error detected: Value null at '{key}' failed to satisfy constraint: Member must not be null")))
}

fn stream_name(req: &Json) -> Result<String> {
    if let Some(n) = req.get("StreamName").and_then(Json::as_str) {
        return Ok(n.to_string());
    }
    if let Some(arn) = req.get("StreamARN").and_then(Json::as_str) {
        return Ok(arn.rsplit('/').next().unwrap_or(arn).to_string());
    }
    Err(ApiError::new(
        "ValidationException",
        "StreamName or StreamARN is required",
    ))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Iterator {
    s: String,
    h: String,
    p: usize,
    t: u64,
    g: u64,
}

fn encode_iterator(it: &Iterator) -> String {
    b64().encode(serde_json::to_vec(it).unwrap_or_default())
}

impl Api {
    pub fn new(limits: Limits, faults: Faults) -> Self {
        Self {
            state: Mutex::new(State::default()),
            limits,
            faults,
            journal: None,
            empty_served: Default::default(),
        }
    }

    /// Like [`Api::new`], keeping every change in `<dir>/journal.jsonl` and replaying it first.
    pub fn open(
        limits: Limits,
        faults: Faults,
        dir: &std::path::Path,
    ) -> std::result::Result<Self, String> {
        use std::io::BufRead;
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("journal.jsonl");
        let mut state = State::default();
        if path.exists() {
            let f = std::fs::File::open(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| e.to_string())?;
                if line.trim().is_empty() {
                    continue;
                }
                // A torn last line (crash mid-write) is dropped; anything else is corruption.
                let Ok(entry) = serde_json::from_str::<Json>(&line) else {
                    tracing::warn!(line = i + 1, "ignoring a torn journal line");
                    continue;
                };
                replay(&mut state, &entry)
                    .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(Self {
            state: Mutex::new(state),
            limits,
            faults,
            journal: Some(Mutex::new(std::io::BufWriter::new(file))),
            empty_served: Default::default(),
        })
    }

    fn record(&self, entries: &[Json]) -> Result<()> {
        use std::io::Write;
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let mut w = j.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries {
            writeln!(w, "{e}").map_err(|e| ApiError {
                kind: "InternalFailure",
                message: format!("journal: {e}"),
                status: 500,
            })?;
        }
        w.flush().map_err(|e| ApiError {
            kind: "InternalFailure",
            message: format!("journal: {e}"),
            status: 500,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs one operation.
    pub fn call(&self, op: &str, req: &Json) -> Result<Json> {
        let failing =
            self.faults.error_ops.is_empty() || self.faults.error_ops.iter().any(|o| o == op);
        if failing && self.faults.error_rate > 0.0 && rand::random::<f64>() < self.faults.error_rate
        {
            return Err(ApiError {
                kind: "InternalFailure",
                message: "injected failure".into(),
                status: 500,
            });
        }
        let now = now_ms();
        match op {
            "CreateStream" => {
                let name = str_arg(req, "StreamName")?.to_string();
                let count = req.get("ShardCount").and_then(Json::as_u64).unwrap_or(4) as usize;
                if count == 0 || count > 10_000 {
                    return Err(ApiError::invalid("ShardCount must be between 1 and 10000"));
                }
                let mut st = self.state();
                if st.streams.contains_key(&name) {
                    return Err(ApiError::new(
                        "ResourceInUseException",
                        format!("Stream {name} under account 000000000000 already exists."),
                    ));
                }
                self.record(&[json!({"op": "create", "name": name, "count": count, "now": now})])?;
                st.generation += 1;
                let g = st.generation;
                st.streams
                    .insert(name.clone(), Stream::new(&name, count, now, g));
                Ok(json!({}))
            }
            "DeleteStream" => {
                let name = stream_name(req)?;
                let mut st = self.state();
                st.stream(&name)?;
                self.record(&[json!({"op": "delete", "name": name})])?;
                st.streams.remove(&name);
                Ok(json!({}))
            }
            "ListStreams" => {
                let st = self.state();
                let names: Vec<&String> = st.streams.keys().collect();
                let summaries: Vec<Json> = st
                    .streams
                    .values()
                    .map(|s| json!({"StreamName": s.name, "StreamARN": s.arn, "StreamStatus": "ACTIVE", "StreamCreationTimestamp": s.created_ms as f64 / 1000.0}))
                    .collect();
                Ok(
                    json!({"StreamNames": names, "HasMoreStreams": false, "StreamSummaries": summaries}),
                )
            }
            "DescribeStream" | "DescribeStreamSummary" => {
                let name = stream_name(req)?;
                let mut st = self.state();
                let s = st.stream(&name)?;
                let mut d = json!({
                    "StreamName": s.name,
                    "StreamARN": s.arn,
                    "StreamStatus": "ACTIVE",
                    "RetentionPeriodHours": s.retention_hours,
                    "StreamCreationTimestamp": s.created_ms as f64 / 1000.0,
                    "EnhancedMonitoring": [{"ShardLevelMetrics": []}],
                    "EncryptionType": "NONE",
                    "StreamModeDetails": {"StreamMode": "PROVISIONED"},
                });
                if op == "DescribeStream" {
                    d["Shards"] = Json::Array(s.shards.iter().map(|x| x.describe()).collect());
                    d["HasMoreShards"] = json!(false);
                    Ok(json!({"StreamDescription": d}))
                } else {
                    d["OpenShardCount"] = json!(s.open_shards());
                    d["ConsumerCount"] = json!(0);
                    Ok(json!({"StreamDescriptionSummary": d}))
                }
            }
            "ListShards" => self.list_shards(req),
            "PutRecord" => {
                let name = stream_name(req)?;
                let pk = str_arg(req, "PartitionKey")?;
                let data = b64()
                    .decode(str_arg(req, "Data")?)
                    .map_err(|_| ApiError::new("SerializationException", "Data is not base64"))?;
                if data.len() + pk.len() > MAX_RECORD_BYTES {
                    return Err(ApiError::new("ValidationException", "1 validation error detected: Value at 'data' failed to satisfy constraint: Member must have length less than or equal to 1048576"));
                }
                let mut st = self.state();
                let s = st.stream(&name)?;
                let shard = s.route(pk, req.get("ExplicitHashKey").and_then(Json::as_str))?;
                s.check_write(
                    shard,
                    (data.len() + pk.len()) as u64,
                    &self.limits,
                    rate_ms(),
                )?;
                self.record(&[json!({"op": "put", "stream": name, "shard": shard, "pk": pk, "data": b64().encode(&data), "now": now})])?;
                let (id, sq) = s.append(shard, pk, data, now);
                Ok(json!({"ShardId": id, "SequenceNumber": sq, "EncryptionType": "NONE"}))
            }
            "PutRecords" => {
                let name = stream_name(req)?;
                let records = req
                    .get("Records")
                    .and_then(Json::as_array)
                    .ok_or_else(|| ApiError::new("ValidationException", "Records is required"))?;
                if records.is_empty() || records.len() > 500 {
                    return Err(ApiError::new("ValidationException", "1 validation error detected: Value at 'records' failed to satisfy constraint: Member must have length between 1 and 500"));
                }
                let mut decoded = Vec::new();
                let mut total = 0usize;
                for r in records {
                    let pk = str_arg(r, "PartitionKey")?.to_string();
                    let data = b64().decode(str_arg(r, "Data")?).map_err(|_| {
                        ApiError::new("SerializationException", "Data is not base64")
                    })?;
                    if data.len() + pk.len() > MAX_RECORD_BYTES {
                        return Err(ApiError::new(
                            "ValidationException",
                            "a record is larger than 1 MiB",
                        ));
                    }
                    total += data.len() + pk.len();
                    decoded.push((
                        pk,
                        data,
                        r.get("ExplicitHashKey")
                            .and_then(Json::as_str)
                            .map(String::from),
                    ));
                }
                if total > 5 * MAX_RECORD_BYTES {
                    return Err(ApiError::invalid("Records size exceeds 5 MB limit"));
                }
                let mut st = self.state();
                let s = st.stream(&name)?;
                let mut failed = 0;
                let mut out = Vec::new();
                let mut journal = Vec::new();
                for (pk, data, ehk) in decoded {
                    let shard = s.route(&pk, ehk.as_deref())?;
                    match s.check_write(
                        shard,
                        (data.len() + pk.len()) as u64,
                        &self.limits,
                        rate_ms(),
                    ) {
                        Ok(()) => {
                            if self.journal.is_some() {
                                journal.push(json!({"op": "put", "stream": name, "shard": shard, "pk": pk, "data": b64().encode(&data), "now": now}));
                            }
                            let (id, sq) = s.append(shard, &pk, data, now);
                            out.push(json!({"ShardId": id, "SequenceNumber": sq}));
                        }
                        Err(e) => {
                            failed += 1;
                            out.push(json!({"ErrorCode": e.kind, "ErrorMessage": e.message}));
                        }
                    }
                }
                self.record(&journal)?;
                Ok(json!({"FailedRecordCount": failed, "Records": out, "EncryptionType": "NONE"}))
            }
            "GetShardIterator" => self.get_shard_iterator(req, now),
            "GetRecords" => self.get_records(req, now),
            "SplitShard" => {
                let name = stream_name(req)?;
                let mut st = self.state();
                let (shard, key) = (
                    str_arg(req, "ShardToSplit")?,
                    str_arg(req, "NewStartingHashKey")?,
                );
                st.stream(&name)?.split(shard, key)?;
                self.record(&[json!({"op": "split", "stream": name, "shard": shard, "key": key})])?;
                Ok(json!({}))
            }
            "MergeShards" => {
                let name = stream_name(req)?;
                let mut st = self.state();
                let (a, b) = (
                    str_arg(req, "ShardToMerge")?,
                    str_arg(req, "AdjacentShardToMerge")?,
                );
                st.stream(&name)?.merge(a, b)?;
                self.record(&[json!({"op": "merge", "stream": name, "a": a, "b": b})])?;
                Ok(json!({}))
            }
            "UpdateShardCount" => {
                let name = stream_name(req)?;
                let target = req
                    .get("TargetShardCount")
                    .and_then(Json::as_u64)
                    .unwrap_or(0) as usize;
                let mut st = self.state();
                let s = st.stream(&name)?;
                let current = s.open_shards();
                s.update_shard_count(target)?;
                self.record(&[json!({"op": "scale", "stream": name, "target": target})])?;
                Ok(
                    json!({"StreamName": name, "CurrentShardCount": current, "TargetShardCount": target}),
                )
            }
            "IncreaseStreamRetentionPeriod" | "DecreaseStreamRetentionPeriod" => {
                let name = stream_name(req)?;
                let hours = req
                    .get("RetentionPeriodHours")
                    .and_then(Json::as_u64)
                    .unwrap_or(24);
                if !(24..=8760).contains(&hours) {
                    return Err(ApiError::invalid(
                        "RetentionPeriodHours must be between 24 and 8760",
                    ));
                }
                let mut st = self.state();
                st.stream(&name)?.retention_hours = hours as u32;
                self.record(&[json!({"op": "retention", "stream": name, "hours": hours})])?;
                Ok(json!({}))
            }
            other => Err(ApiError::new(
                "UnknownOperationException",
                format!("operation {other} is not supported by kinesis-sim"),
            )),
        }
    }

    fn list_shards(&self, req: &Json) -> Result<Json> {
        let (name, start) = match req.get("NextToken").and_then(Json::as_str) {
            Some(t) => {
                let raw = b64()
                    .decode(t)
                    .map_err(|_| ApiError::invalid("Invalid NextToken"))?;
                let v: Json = serde_json::from_slice(&raw)
                    .map_err(|_| ApiError::invalid("Invalid NextToken"))?;
                (
                    v["s"].as_str().unwrap_or_default().to_string(),
                    v["i"].as_u64().unwrap_or(0) as usize,
                )
            }
            None => (stream_name(req)?, 0),
        };
        let max = req
            .get("MaxResults")
            .and_then(Json::as_u64)
            .unwrap_or(1000)
            .clamp(1, 10_000) as usize;
        let mut st = self.state();
        let s = st.stream(&name)?;
        let filter = req.get("ShardFilter");
        let ftype = filter
            .and_then(|f| f.get("Type"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let after = filter
            .and_then(|f| f.get("ShardId"))
            .and_then(Json::as_str)
            .or_else(|| req.get("ExclusiveStartShardId").and_then(Json::as_str));
        let shards: Vec<Json> = s
            .shards
            .iter()
            .filter(|x| match ftype {
                "AT_LATEST" => x.is_open(),
                _ => true,
            })
            .filter(|x| after.is_none_or(|a| x.id.as_str() > a))
            .skip(start)
            .take(max + 1)
            .map(|x| x.describe())
            .collect();
        let more = shards.len() > max;
        let shards: Vec<Json> = shards.into_iter().take(max).collect();
        let mut out = json!({"Shards": shards});
        if more {
            out["NextToken"] =
                json!(b64().encode(json!({"s": name, "i": start + max}).to_string()));
        }
        Ok(out)
    }

    fn get_shard_iterator(&self, req: &Json, now: u64) -> Result<Json> {
        let name = stream_name(req)?;
        let shard_id = str_arg(req, "ShardId")?;
        let kind = str_arg(req, "ShardIteratorType")?;
        let mut st = self.state();
        let s = st.stream(&name)?;
        let i = s.shard(shard_id)?;
        let recs = &s.shards[i].records;
        let pos = match kind {
            "TRIM_HORIZON" => 0,
            "LATEST" => recs.len(),
            "AT_SEQUENCE_NUMBER" | "AFTER_SEQUENCE_NUMBER" => {
                let c = parse_seq(str_arg(req, "StartingSequenceNumber")?)?;
                if kind == "AT_SEQUENCE_NUMBER" {
                    recs.partition_point(|r| r.counter < c)
                } else {
                    recs.partition_point(|r| r.counter <= c)
                }
            }
            "AT_TIMESTAMP" => {
                let ts = req
                    .get("Timestamp")
                    .and_then(Json::as_f64)
                    .ok_or_else(|| ApiError::invalid("Timestamp is required for AT_TIMESTAMP"))?;
                let ms = (ts * 1000.0) as u64;
                recs.partition_point(|r| r.arrival_ms < ms)
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "Invalid ShardIteratorType {other}"
                )))
            }
        };
        let it = Iterator {
            s: name,
            h: shard_id.into(),
            p: pos,
            t: now,
            g: s.generation,
        };
        Ok(json!({"ShardIterator": encode_iterator(&it)}))
    }

    /// Whether this read of the shard gets one of its empty first pages.
    fn empty_page(&self, stream: &str, shard: &str) -> bool {
        if self.faults.empty_pages == 0 {
            return false;
        }
        let mut served = self.empty_served.lock().unwrap_or_else(|p| p.into_inner());
        let n = served
            .entry((stream.to_string(), shard.to_string()))
            .or_default();
        *n += 1;
        *n <= self.faults.empty_pages
    }

    fn get_records(&self, req: &Json, now: u64) -> Result<Json> {
        let raw = b64()
            .decode(str_arg(req, "ShardIterator")?)
            .map_err(|_| ApiError::invalid("Invalid ShardIterator"))?;
        let it: Iterator =
            serde_json::from_slice(&raw).map_err(|_| ApiError::invalid("Invalid ShardIterator"))?;
        let limit = req.get("Limit").and_then(Json::as_u64).unwrap_or(10_000);
        if !(1..=10_000).contains(&limit) {
            return Err(ApiError::invalid("Limit must be between 1 and 10000"));
        }
        if now.saturating_sub(it.t) > self.limits.iterator_ttl_ms {
            return Err(ApiError::new("ExpiredIteratorException", format!("Iterator expired. The iterator was created at time {} while right now it is {}", it.t, now)));
        }
        if self.faults.throttle_rate > 0.0 && rand::random::<f64>() < self.faults.throttle_rate {
            return Err(ApiError::throttled("Rate exceeded (injected)"));
        }
        let mut st = self.state();
        let s = st.stream(&it.s)?;
        if s.generation != it.g {
            return Err(ApiError::not_found(format!("Stream {} was deleted", it.s)));
        }
        let i = s.shard(&it.h)?;
        s.check_read(i, &self.limits, rate_ms())?;
        if self.empty_page(&it.s, &it.h) {
            let shard = &s.shards[i];
            let behind = shard
                .records
                .get(it.p)
                .zip(shard.records.last())
                .map_or(0, |(next, last)| {
                    last.arrival_ms.saturating_sub(next.arrival_ms).max(1)
                });
            let next = Iterator { t: now, ..it };
            return Ok(json!({
                "Records": [],
                "MillisBehindLatest": behind,
                "NextShardIterator": encode_iterator(&next),
            }));
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut pos = it.p;
        {
            let recs = &s.shards[i].records;
            while pos < recs.len() && (out.len() as u64) < limit {
                let r = &recs[pos];
                if bytes + r.data.len() > 10 * 1024 * 1024 && !out.is_empty() {
                    break;
                }
                bytes += r.data.len() + r.partition_key.len();
                out.push(json!({
                    "SequenceNumber": seq(r.counter),
                    "ApproximateArrivalTimestamp": r.arrival_ms as f64 / 1000.0,
                    "Data": b64().encode(&r.data),
                    "PartitionKey": r.partition_key,
                }));
                pos += 1;
            }
        }
        if !s.read_bytes_allowed(i, bytes as u64, &self.limits, rate_ms()) {
            return Err(ApiError::throttled(
                "Read rate exceeded (2 MiB/s per shard)",
            ));
        }
        let shard = &s.shards[i];
        let behind = shard
            .records
            .last()
            .filter(|_| pos < shard.records.len())
            .map_or(0, |last| {
                last.arrival_ms.saturating_sub(
                    shard
                        .records
                        .get(pos)
                        .map_or(last.arrival_ms, |r| r.arrival_ms),
                )
            });
        let mut resp = json!({"Records": out, "MillisBehindLatest": behind});
        if !shard.is_open() && pos >= shard.records.len() {
            // A closed shard read to its end: no next iterator, and its children.
            resp["ChildShards"] = Json::Array(s.children(&it.h));
        } else {
            let next = Iterator {
                s: it.s.clone(),
                h: it.h.clone(),
                p: pos,
                t: now,
                g: it.g,
            };
            resp["NextShardIterator"] = json!(encode_iterator(&next));
        }
        Ok(resp)
    }
}

//! The simulated Kinesis: streams, shards, records, lineage, limits. Pure state, no I/O.

use serde_json::{json, Value as Json};
use std::collections::BTreeMap;

/// Kinesis errors: the `__type` and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: &'static str,
    pub message: String,
    /// HTTP status (400 for client errors, 500 for InternalFailure).
    pub status: u16,
}

impl ApiError {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            status: 400,
        }
    }
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new("ResourceNotFoundException", what)
    }
    pub fn invalid(what: impl Into<String>) -> Self {
        Self::new("InvalidArgumentException", what)
    }
    pub fn throttled(what: impl Into<String>) -> Self {
        Self::new("ProvisionedThroughputExceededException", what)
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

/// Limits (AWS's by default).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub enabled: bool,
    pub write_records_per_sec: u64,
    pub write_bytes_per_sec: u64,
    pub read_calls_per_sec: u64,
    pub read_bytes_per_sec: u64,
    pub iterator_ttl_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            enabled: true,
            write_records_per_sec: 1000,
            write_bytes_per_sec: 1024 * 1024,
            read_calls_per_sec: 5,
            read_bytes_per_sec: 2 * 1024 * 1024,
            iterator_ttl_ms: 300_000,
        }
    }
}

pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
pub const MAX_HASH: u128 = u128::MAX;
const SEQ_PREFIX: &str = "4967342557749725999925894881";

#[derive(Debug, Clone)]
pub struct Record {
    pub counter: u128,
    pub partition_key: String,
    pub data: Vec<u8>,
    pub arrival_ms: u64,
}

/// A per-second usage window, on the rate clock (monotonic milliseconds, `rate_ms`).
#[derive(Debug, Default, Clone)]
struct Window {
    second: u64,
    count: u64,
    bytes: u64,
}

impl Window {
    fn take(
        &mut self,
        rate_ms: u64,
        count: u64,
        bytes: u64,
        max_count: u64,
        max_bytes: u64,
    ) -> bool {
        let s = rate_ms / 1000;
        if s != self.second {
            *self = Window {
                second: s,
                ..Default::default()
            };
        }
        if self.count + count > max_count || self.bytes + bytes > max_bytes {
            return false;
        }
        self.count += count;
        self.bytes += bytes;
        true
    }
}

#[derive(Debug, Clone)]
pub struct Shard {
    pub id: String,
    pub parent: Option<String>,
    pub adjacent_parent: Option<String>,
    pub hash_start: u128,
    pub hash_end: u128,
    pub starting_counter: u128,
    pub ending_counter: Option<u128>,
    pub records: Vec<Record>,
    writes: Window,
    reads: Window,
}

impl Shard {
    fn new(
        index: usize,
        start: u128,
        end: u128,
        counter: u128,
        parent: Option<String>,
        adjacent: Option<String>,
    ) -> Self {
        Self {
            id: format!("shardId-{index:012}"),
            parent,
            adjacent_parent: adjacent,
            hash_start: start,
            hash_end: end,
            starting_counter: counter,
            ending_counter: None,
            records: Vec::new(),
            writes: Window::default(),
            reads: Window::default(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.ending_counter.is_none()
    }

    pub fn describe(&self) -> Json {
        let mut range = json!({ "StartingSequenceNumber": seq(self.starting_counter) });
        if let Some(e) = self.ending_counter {
            range["EndingSequenceNumber"] = json!(seq(e));
        }
        let mut out = json!({
            "ShardId": self.id,
            "HashKeyRange": {"StartingHashKey": self.hash_start.to_string(), "EndingHashKey": self.hash_end.to_string()},
            "SequenceNumberRange": range,
        });
        if let Some(p) = &self.parent {
            out["ParentShardId"] = json!(p);
        }
        if let Some(p) = &self.adjacent_parent {
            out["AdjacentParentShardId"] = json!(p);
        }
        out
    }
}

/// A 56-digit sequence number from a per-stream counter.
pub fn seq(counter: u128) -> String {
    format!("{SEQ_PREFIX}{counter:028}")
}

/// The counter back from a sequence number we issued.
pub fn parse_seq(s: &str) -> Result<u128> {
    s.strip_prefix(SEQ_PREFIX)
        .filter(|_| s.len() == 56)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ApiError::invalid(format!("Invalid SequenceNumber {s}")))
}

#[derive(Debug, Clone)]
pub struct Stream {
    pub name: String,
    pub arn: String,
    pub created_ms: u64,
    pub retention_hours: u32,
    pub shards: Vec<Shard>,
    pub counter: u128,
    /// Distinguishes a re-created stream of the same name (stale iterators).
    pub generation: u64,
}

impl Stream {
    pub fn new(name: &str, shard_count: usize, now_ms: u64, generation: u64) -> Self {
        let mut s = Stream {
            name: name.into(),
            arn: format!("arn:aws:kinesis:us-east-1:000000000000:stream/{name}"),
            created_ms: now_ms,
            retention_hours: 24,
            shards: Vec::new(),
            counter: 1,
            generation,
        };
        for (i, (a, b)) in uniform_ranges(shard_count).into_iter().enumerate() {
            s.shards.push(Shard::new(i, a, b, s.counter, None, None));
        }
        s
    }

    pub fn shard(&self, id: &str) -> Result<usize> {
        self.shards.iter().position(|s| s.id == id).ok_or_else(|| {
            ApiError::not_found(format!(
                "Shard {id} in stream {} under account 000000000000 does not exist",
                self.name
            ))
        })
    }

    pub fn open_shards(&self) -> usize {
        self.shards.iter().filter(|s| s.is_open()).count()
    }

    /// Routes a record by hash key to the one *open* shard covering it.
    pub fn route(&self, partition_key: &str, explicit_hash_key: Option<&str>) -> Result<usize> {
        if partition_key.is_empty() || partition_key.len() > 256 {
            return Err(ApiError::new("ValidationException", "1 validation error detected: Value at 'partitionKey' failed to satisfy constraint: Member must have length between 1 and 256"));
        }
        let key: u128 = match explicit_hash_key {
            Some(h) => h.parse().map_err(|_| {
                ApiError::invalid(format!(
                    "ExplicitHashKey {h} is not a 128-bit decimal integer"
                ))
            })?,
            None => {
                use md5::{Digest, Md5};
                let d = Md5::digest(partition_key.as_bytes());
                u128::from_be_bytes(d.into())
            }
        };
        self.shards
            .iter()
            .position(|s| s.is_open() && s.hash_start <= key && key <= s.hash_end)
            .ok_or_else(|| ApiError::new("InternalFailure", "no open shard covers the hash key"))
    }

    /// Appends a record (limits checked by the caller's `check_write`).
    pub fn append(
        &mut self,
        shard: usize,
        partition_key: &str,
        data: Vec<u8>,
        now_ms: u64,
    ) -> (String, String) {
        let counter = self.counter;
        self.counter += 1;
        let s = &mut self.shards[shard];
        s.records.push(Record {
            counter,
            partition_key: partition_key.into(),
            data,
            arrival_ms: now_ms,
        });
        (s.id.clone(), seq(counter))
    }

    pub fn check_write(
        &mut self,
        shard: usize,
        bytes: u64,
        limits: &Limits,
        rate_ms: u64,
    ) -> Result<()> {
        if !limits.enabled {
            return Ok(());
        }
        let s = &mut self.shards[shard];
        if s.writes.take(
            rate_ms,
            1,
            bytes,
            limits.write_records_per_sec,
            limits.write_bytes_per_sec,
        ) {
            Ok(())
        } else {
            Err(ApiError::throttled(format!(
                "Rate exceeded for shard {} in stream {} under account 000000000000.",
                s.id, self.name
            )))
        }
    }

    pub fn check_read(&mut self, shard: usize, limits: &Limits, rate_ms: u64) -> Result<()> {
        if !limits.enabled {
            return Ok(());
        }
        let s = &mut self.shards[shard];
        if s.reads
            .take(rate_ms, 1, 0, limits.read_calls_per_sec, u64::MAX)
        {
            Ok(())
        } else {
            Err(ApiError::throttled(format!(
                "Rate exceeded for shard {} in stream {} under account 000000000000.",
                s.id, self.name
            )))
        }
    }

    pub fn read_bytes_allowed(
        &mut self,
        shard: usize,
        bytes: u64,
        limits: &Limits,
        rate_ms: u64,
    ) -> bool {
        !limits.enabled
            || self.shards[shard]
                .reads
                .take(rate_ms, 0, bytes, u64::MAX, limits.read_bytes_per_sec)
    }

    fn close(&mut self, shard: usize) {
        let last = self.counter;
        self.counter += 1;
        self.shards[shard].ending_counter = Some(last);
    }

    pub fn split(&mut self, shard_id: &str, new_start: &str) -> Result<()> {
        let i = self.shard(shard_id)?;
        let new_start: u128 = new_start.parse().map_err(|_| {
            ApiError::invalid("NewStartingHashKey is not a 128-bit decimal integer")
        })?;
        let (a, b) = (self.shards[i].hash_start, self.shards[i].hash_end);
        if !self.shards[i].is_open() {
            return Err(ApiError::new(
                "ResourceInUseException",
                format!("Shard {shard_id} is closed"),
            ));
        }
        if new_start <= a || new_start > b {
            return Err(ApiError::invalid(format!("NewStartingHashKey {new_start} is not within the hash key range of shard {shard_id}")));
        }
        self.close(i);
        let n = self.shards.len();
        let parent = Some(shard_id.to_string());
        let c = self.counter;
        self.shards
            .push(Shard::new(n, a, new_start - 1, c, parent.clone(), None));
        self.shards
            .push(Shard::new(n + 1, new_start, b, c, parent, None));
        Ok(())
    }

    pub fn merge(&mut self, shard_id: &str, adjacent_id: &str) -> Result<()> {
        let i = self.shard(shard_id)?;
        let j = self.shard(adjacent_id)?;
        if !self.shards[i].is_open() || !self.shards[j].is_open() {
            return Err(ApiError::new(
                "ResourceInUseException",
                "both shards must be open to merge",
            ));
        }
        let (lo, hi) = if self.shards[i].hash_start < self.shards[j].hash_start {
            (i, j)
        } else {
            (j, i)
        };
        if self.shards[lo].hash_end.checked_add(1) != Some(self.shards[hi].hash_start) {
            return Err(ApiError::invalid(format!(
                "Shards {shard_id} and {adjacent_id} are not adjacent"
            )));
        }
        let (a, b) = (self.shards[lo].hash_start, self.shards[hi].hash_end);
        self.close(i);
        self.close(j);
        let n = self.shards.len();
        let c = self.counter;
        self.shards.push(Shard::new(
            n,
            a,
            b,
            c,
            Some(shard_id.into()),
            Some(adjacent_id.into()),
        ));
        Ok(())
    }

    /// Uniform scaling: open shards are closed and `target` new ones cover the key space;
    /// each new shard's parents are the (at most two) old shards covering its range ends.
    pub fn update_shard_count(&mut self, target: usize) -> Result<()> {
        if target == 0 || target > 10_000 {
            return Err(ApiError::invalid(
                "TargetShardCount must be between 1 and 10000",
            ));
        }
        let open: Vec<usize> = (0..self.shards.len())
            .filter(|i| self.shards[*i].is_open())
            .collect();
        for i in &open {
            self.close(*i);
        }
        let c = self.counter;
        for (a, b) in uniform_ranges(target) {
            let covering = |k: u128| {
                open.iter()
                    .find(|i| self.shards[**i].hash_start <= k && k <= self.shards[**i].hash_end)
                    .map(|i| self.shards[*i].id.clone())
            };
            let parent = covering(a);
            let adjacent = covering(b).filter(|x| Some(x) != parent.as_ref());
            let n = self.shards.len();
            self.shards.push(Shard::new(n, a, b, c, parent, adjacent));
        }
        Ok(())
    }

    /// Children of a closed shard (for GetRecords' ChildShards).
    pub fn children(&self, shard_id: &str) -> Vec<Json> {
        self.shards
            .iter()
            .filter(|s| s.parent.as_deref() == Some(shard_id) || s.adjacent_parent.as_deref() == Some(shard_id))
            .map(|s| {
                let parents: Vec<&String> = [&s.parent, &s.adjacent_parent].into_iter().flatten().collect();
                json!({
                    "ShardId": s.id,
                    "ParentShards": parents,
                    "HashKeyRange": {"StartingHashKey": s.hash_start.to_string(), "EndingHashKey": s.hash_end.to_string()},
                })
            })
            .collect()
    }
}

fn uniform_ranges(n: usize) -> Vec<(u128, u128)> {
    let n = n.max(1) as u128;
    let step = MAX_HASH / n;
    (0..n)
        .map(|i| {
            let a = i * step;
            let b = if i + 1 == n {
                MAX_HASH
            } else {
                (i + 1) * step - 1
            };
            (a, b)
        })
        .collect()
}

/// All streams.
#[derive(Debug, Default)]
pub struct State {
    pub streams: BTreeMap<String, Stream>,
    pub generation: u64,
}

impl State {
    pub fn stream(&mut self, name: &str) -> Result<&mut Stream> {
        self.streams.get_mut(name).ok_or_else(|| {
            ApiError::not_found(format!(
                "Stream {name} under account 000000000000 not found."
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_are_56_digits_and_increase() {
        let a = seq(1);
        let b = seq(2);
        assert_eq!(a.len(), 56);
        assert!(a < b);
        assert_eq!(parse_seq(&b).unwrap(), 2);
        assert!(parse_seq("12").is_err());
    }

    #[test]
    fn split_merge_and_scaling_keep_lineage_and_cover_the_key_space() {
        let mut s = Stream::new("s", 2, 0, 1);
        assert_eq!(s.shards[0].hash_start, 0);
        assert_eq!(s.shards[1].hash_end, MAX_HASH);
        assert_eq!(s.shards[0].hash_end + 1, s.shards[1].hash_start);
        let mid = (s.shards[0].hash_end / 2).to_string();
        s.split("shardId-000000000000", &mid).unwrap();
        assert!(!s.shards[0].is_open());
        assert_eq!(s.shards[2].parent.as_deref(), Some("shardId-000000000000"));
        assert!(
            s.split("shardId-000000000000", &mid).is_err(),
            "closed shards cannot split"
        );
        s.merge("shardId-000000000002", "shardId-000000000003")
            .unwrap();
        assert_eq!(
            s.shards[4].adjacent_parent.as_deref(),
            Some("shardId-000000000003")
        );
        assert_eq!(s.open_shards(), 2);
        // Writes go to open shards only.
        for k in 0..200 {
            let i = s.route(&format!("k{k}"), None).unwrap();
            assert!(s.shards[i].is_open());
        }
        s.update_shard_count(4).unwrap();
        assert_eq!(s.open_shards(), 4);
        assert!(s
            .shards
            .iter()
            .filter(|x| x.is_open())
            .all(|x| x.parent.is_some()));
        assert_eq!(s.children("shardId-000000000000").len(), 2);
    }

    #[test]
    fn limits_throttle_per_second() {
        let mut s = Stream::new("s", 1, 0, 1);
        let limits = Limits::default();
        for _ in 0..5 {
            s.check_read(0, &limits, 1000).unwrap();
        }
        assert_eq!(
            s.check_read(0, &limits, 1500).unwrap_err().kind,
            "ProvisionedThroughputExceededException"
        );
        s.check_read(0, &limits, 2000).unwrap();
        let off = Limits {
            enabled: false,
            ..limits
        };
        for _ in 0..100 {
            s.check_read(0, &off, 2000).unwrap();
        }
    }
}

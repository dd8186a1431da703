//! Raft storage in sled: log entries, hard state, conf state and the latest snapshot.
//!
//! Layout (one sled `Db` under `<data_dir>/raft`):
//! - tree `log`: big-endian index -> `eraftpb::Entry` (rust-protobuf bytes);
//! - tree `meta`: `hard_state`, `conf_state`, `snapshot` (metadata + catalog bytes).
//!
//! Entries at or below the snapshot's index are deleted ("compacted"); a follower that needs
//! them receives the snapshot instead.

use crate::error::{Error, Result};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::path::Path;
use std::sync::{Arc, RwLock};

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";

struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_meta: SnapshotMetadata,
    /// Index of the last entry in the log (or the snapshot index when the log is empty).
    last_index: u64,
}

/// A handle on the node's Raft storage; clones share the same store.
#[derive(Clone)]
pub struct SledStorage {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    cached: Arc<RwLock<Cached>>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M> {
    M::parse_from_bytes(bytes).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

fn encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>> {
    m.write_to_bytes()
        .map_err(|e| Error::Corrupt(format!("encode: {e}")))
}

fn store_err(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl SledStorage {
    /// Opens (or creates) the store. A new store starts with `voters` as its membership, the
    /// same on every member, so a static group can elect its first leader.
    pub fn open(dir: &Path, voters: &[u64]) -> Result<Self> {
        let db = common::datadir::open_sled(dir)?;
        let log = db.open_tree("log")?;
        let meta = db.open_tree("meta")?;
        let hard_state: HardState = match meta.get(HARD_STATE)? {
            Some(b) => decode(&b, "hard state")?,
            None => HardState::default(),
        };
        let snapshot_meta = match meta.get(SNAPSHOT)? {
            Some(b) => decode::<Snapshot>(&b, "snapshot")?.take_metadata(),
            None => SnapshotMetadata::default(),
        };
        let conf_state = match meta.get(CONF_STATE)? {
            Some(b) => decode(&b, "conf state")?,
            None => {
                let mut cs = ConfState::default();
                cs.set_voters(voters.to_vec());
                meta.insert(CONF_STATE, encode(&cs)?)?;
                cs
            }
        };
        let last_index = match log.last()? {
            Some((k, _)) => u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| Error::Corrupt("log key".into()))?,
            ),
            None => snapshot_meta.index,
        };
        db.flush()?;
        Ok(Self {
            db,
            log,
            meta,
            cached: Arc::new(RwLock::new(Cached {
                hard_state,
                conf_state,
                snapshot_meta,
                last_index,
            })),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cached> {
        self.cached.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Cached> {
        self.cached.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored snapshot (empty data if none was taken yet).
    pub fn load_snapshot(&self) -> Result<Snapshot> {
        match self.meta.get(SNAPSHOT)? {
            Some(b) => decode(&b, "snapshot"),
            None => Ok(Snapshot::default()),
        }
    }

    pub fn snapshot_index(&self) -> u64 {
        self.read().snapshot_meta.index
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// Appends entries, replacing any conflicting suffix.
    pub fn append(&self, entries: &[Entry]) -> Result<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut cached = self.write();
        if first.index <= cached.snapshot_meta.index {
            return Err(Error::Corrupt(format!(
                "append at {} overwrites compacted log (snapshot at {})",
                first.index, cached.snapshot_meta.index
            )));
        }
        let mut batch = sled::Batch::default();
        // Drop any old entries after the new ones' start (a new leader overwrote them).
        for idx in first.index..=cached.last_index {
            batch.remove(&key(idx));
        }
        for e in entries {
            batch.insert(&key(e.index), encode(e)?);
        }
        self.log.apply_batch(batch)?;
        cached.last_index = entries.last().map_or(cached.last_index, |e| e.index);
        Ok(())
    }

    /// Records the membership after a configuration change was applied.
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<()> {
        self.meta.insert(CONF_STATE, encode(cs)?)?;
        self.write().conf_state = cs.clone();
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<()> {
        self.meta.insert(HARD_STATE, encode(hs)?)?;
        self.write().hard_state = hs.clone();
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<()> {
        let mut hs = self.read().hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Makes everything written so far durable.
    pub async fn sync(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Installs a snapshot received from the leader: the log is replaced by it.
    pub fn apply_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let meta = snapshot.get_metadata();
        let mut cached = self.write();
        if meta.index < cached.snapshot_meta.index {
            return Ok(()); // an older snapshot than ours: nothing to learn
        }
        self.log.clear()?;
        self.meta.insert(SNAPSHOT, encode(snapshot)?)?;
        self.meta
            .insert(CONF_STATE, encode(meta.get_conf_state())?)?;
        cached.hard_state.term = cached.hard_state.term.max(meta.term);
        cached.hard_state.commit = cached.hard_state.commit.max(meta.index);
        self.meta.insert(HARD_STATE, encode(&cached.hard_state)?)?;
        cached.conf_state = meta.get_conf_state().clone();
        cached.snapshot_meta = meta.clone();
        cached.last_index = meta.index;
        Ok(())
    }

    /// Records a snapshot of the state machine at `index` (already applied) and deletes the
    /// log up to it.
    pub fn compact_to_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<()> {
        let term = raft::Storage::term(self, index)?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        self.meta.insert(SNAPSHOT, encode(&snapshot)?)?;
        let first = self.read().snapshot_meta.index + 1;
        let mut batch = sled::Batch::default();
        for idx in first..=index {
            batch.remove(&key(idx));
        }
        self.log.apply_batch(batch)?;
        let mut cached = self.write();
        cached.snapshot_meta = snapshot.take_metadata();
        cached.last_index = cached.last_index.max(index);
        Ok(())
    }

    /// Number of entries currently held in the log (for tests and status).
    pub fn log_len(&self) -> usize {
        self.log.len()
    }
}

impl raft::Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.read();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let c = self.read();
        if low <= c.snapshot_meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > c.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in self.log.range(key(low)..key(high)) {
            let (_, v) = item.map_err(store_err)?;
            let e = Entry::parse_from_bytes(&v).map_err(store_err)?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
        }
        if out.len() as u64 != (high - low) && max_size.is_none() {
            return Err(store_err(format!("log has a gap in [{low}, {high})")));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let c = self.read();
        if idx == c.snapshot_meta.index {
            return Ok(c.snapshot_meta.term);
        }
        if idx < c.snapshot_meta.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > c.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let v = self
            .log
            .get(key(idx))
            .map_err(store_err)?
            .ok_or_else(|| store_err(format!("missing log entry {idx}")))?;
        Ok(Entry::parse_from_bytes(&v).map_err(store_err)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().snapshot_meta.index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots are taken as the log is compacted, so the stored one always covers
        // every entry a follower can no longer get from the log.
        self.load_snapshot().map_err(store_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Default::default()
        }
    }

    #[test]
    fn append_overwrite_compact_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        // A new leader overwrites index 3 onwards.
        s.append(&[entry(3, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        let got = s
            .entries(1, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 3);
        let limited = s.entries(1, 4, 1, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(limited.len(), 1);

        s.compact_to_snapshot(2, s.conf_state(), b"state".to_vec())
            .unwrap();
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1);
        assert!(s.term(1).is_err());
        assert!(s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .is_err());
        assert_eq!(&s.snapshot(0, 2).unwrap().data[..], b"state");

        let hs = HardState {
            term: 2,
            commit: 3,
            ..Default::default()
        };
        s.set_hard_state(&hs).unwrap();
        drop(s);
        let s = SledStorage::open(dir.path(), &[9]).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.commit, 3);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (3, 3));
    }

    #[test]
    fn install_snapshot_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), &[1]).unwrap();
        s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().mut_conf_state().set_voters(vec![1]);
        s.apply_snapshot(&snap).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (11, 10)
        );
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 10);
        assert_eq!(s.log_len(), 0);
    }
}

//! How rows sit in a table's tree: key = partition (u32 BE) + row id (u64 BE), value = one row
//! as a JSON array, or a *row group*: up to [`GROUP_ROWS`] consecutive rows of one batch in one
//! partition, with ids from the key's on (one sled entry instead of one per row: sled's cost is
//! per entry).

use super::{corrupt, Result};

/// The rows of a batch: ids `first..=last` in each of its partitions.
pub(super) fn batch_rows<'a>(
    tree: &'a sled::Tree,
    partitions: &'a [u32],
    (first, last): (u64, u64),
) -> impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 'a {
    partitions
        .iter()
        .flat_map(move |p| tree.range(row_key(*p, first)..=row_key(*p, last)))
}

/// Most rows in one stored entry. Large enough that sled's per-entry cost is spread thin,
/// small enough that an index lookup reads little beside its row.
pub const GROUP_ROWS: usize = 256;

/// First byte of a row group; a single row is JSON text and starts with `[`.
const GROUP_TAG: u8 = 0x01;

/// A row group: the tag, the row count (u32 LE), each row's end offset (u32 LE), the rows.
/// Public for the storage ceiling (`bench-sled --group`), which writes what the leaves write.
pub fn encode_group<'a>(rows: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let count = rows.len();
    let bytes: usize = rows.clone().map(<[u8]>::len).sum();
    let mut out = Vec::with_capacity(5 + 4 * count + bytes);
    out.push(GROUP_TAG);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    let mut end = 0u32;
    for r in rows.clone() {
        end += r.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for r in rows {
        out.extend_from_slice(r);
    }
    out
}

/// The rows stored under one entry: how many, and row `i` of them.
pub(super) struct Stored<'a> {
    pub partition: u32,
    pub first: u64,
    pub value: &'a [u8],
    pub count: usize,
}

/// The partition and row id of a row key (the inverse of [`row_key`]).
pub(super) fn parse_row_key(key: &[u8]) -> Result<(u32, u64)> {
    let (Some(p), Some(id)) = (key.get(..4), key.get(4..12)) else {
        return Err(corrupt("short row key"));
    };
    Ok((
        u32::from_be_bytes(p.try_into().map_err(corrupt)?),
        u64::from_be_bytes(id.try_into().map_err(corrupt)?),
    ))
}

impl<'a> Stored<'a> {
    pub fn parse(key: &[u8], value: &'a [u8]) -> Result<Self> {
        let (partition, first) = parse_row_key(key)?;
        let count = if value.first() == Some(&GROUP_TAG) {
            let n = value.get(1..5).ok_or_else(|| corrupt("row group header"))?;
            let n = u32::from_le_bytes(n.try_into().map_err(corrupt)?) as usize;
            if value.len() < 5 + 4 * n {
                return Err(corrupt("row group offsets"));
            }
            n
        } else {
            1
        };
        Ok(Stored {
            partition,
            first,
            value,
            count,
        })
    }

    pub fn grouped(&self) -> bool {
        self.value.first() == Some(&GROUP_TAG)
    }

    /// Row `i` (id `first + i`).
    pub fn row(&self, i: usize) -> Result<&'a [u8]> {
        if !self.grouped() {
            return Ok(self.value);
        }
        let end_of = |j: usize| -> Result<usize> {
            let at = 5 + 4 * j;
            let b = self
                .value
                .get(at..at + 4)
                .ok_or_else(|| corrupt("row group offset"))?;
            Ok(u32::from_le_bytes(b.try_into().map_err(corrupt)?) as usize)
        };
        let start = if i == 0 { 0 } else { end_of(i - 1)? };
        let end = end_of(i)?;
        let data = 5 + 4 * self.count;
        self.value
            .get(data + start..data + end)
            .ok_or_else(|| corrupt("row group data"))
    }

    /// Every row with its own row key.
    pub fn rows(&self) -> impl Iterator<Item = Result<([u8; 12], &'a [u8])>> + '_ {
        (0..self.count).map(|i| Ok((row_key(self.partition, self.first + i as u64), self.row(i)?)))
    }
}

pub(super) fn row_key(partition: u32, id: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The row stored under `row_key`, alone or in a row group.
pub(super) fn get_row(tree: &sled::Tree, row_key: &[u8]) -> Result<Option<Vec<u8>>> {
    let (partition, id) = parse_row_key(row_key)?;
    let Some((k, v)) = tree.range(..=row_key).next_back().transpose()? else {
        return Ok(None);
    };
    // The last entry at or below the key: the row's own, or one that does not hold it.
    let stored = Stored::parse(&k, &v)?;
    match id.checked_sub(stored.first).map(|i| i as usize) {
        Some(i) if stored.partition == partition && i < stored.count => {
            Ok(Some(stored.row(i)?.to_vec()))
        }
        _ => Ok(None),
    }
}

//! The catalog's memory of recent requests ([`super::Command::Request`]), so a request proposed
//! again gets its first outcome, and the JSON shape of maps with non-string keys.

use super::Output;
use crate::error::Error;
use serde::{Deserialize, Serialize};

/// How many request outcomes the catalog remembers. A retry comes within the commit timeout
/// (seconds); requests (DDL, task assignments, leaf state changes, task errors) come at tens a
/// second at most (batch commits are idempotent by their own keys and are not logged).
pub const REQUESTS_TO_KEEP: usize = 4096;

/// The outcomes of recent requests, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestLog {
    outcomes: std::collections::VecDeque<(u64, std::result::Result<Output, Error>)>,
    /// The ids in `outcomes` (rebuilt after a snapshot is loaded).
    #[serde(skip)]
    ids: std::collections::HashSet<u64>,
}

impl PartialEq for RequestLog {
    fn eq(&self, other: &Self) -> bool {
        self.outcomes == other.outcomes
    }
}

impl Eq for RequestLog {}

impl RequestLog {
    pub(super) fn get(&mut self, id: u64) -> Option<std::result::Result<Output, Error>> {
        if self.ids.len() != self.outcomes.len() {
            self.ids = self.outcomes.iter().map(|(id, _)| *id).collect();
        }
        if !self.ids.contains(&id) {
            return None; // the common case: a request seen for the first time
        }
        self.outcomes
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, r)| r.clone())
    }

    /// How many outcomes are remembered.
    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    pub(super) fn insert(&mut self, id: u64, outcome: std::result::Result<Output, Error>) {
        self.ids.insert(id);
        self.outcomes.push_back((id, outcome));
        while self.outcomes.len() > REQUESTS_TO_KEEP {
            if let Some((old, _)) = self.outcomes.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// A map with non-string keys as a JSON list of pairs.
pub(super) mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

//! The committed offsets a leaf holds per pipeline, kept up to date from the master's
//! heartbeat answers, which carry only what changed since the version the leaf reports
//! (`OffsetsSeen`): a heartbeat grows with the offsets committed since the last one, not with
//! every source partition a pipeline ever read.

use std::collections::{BTreeMap, HashMap};

/// One pipeline's committed offsets, by source partition key.
#[derive(Default)]
struct Held {
    generation: u64,
    batch_id: u64,
    offsets: BTreeMap<String, proto::SourceOffset>,
}

/// Per pipeline, what this leaf holds.
#[derive(Default)]
pub struct OffsetCache {
    pipelines: HashMap<u64, Held>,
}

impl OffsetCache {
    /// Takes in a heartbeat's assignments: merges each pipeline's offsets (a delta, or the whole
    /// set) and gives every assignment the whole set, as tasks expect. Pipelines without an
    /// assignment are forgotten.
    pub fn merge(&mut self, assignments: &mut [proto::TaskAssignment]) {
        let mut merged: HashMap<u64, ()> = HashMap::new();
        for a in assignments.iter_mut() {
            let held = self.pipelines.entry(a.pipeline_id).or_default();
            if merged.insert(a.pipeline_id, ()).is_none() {
                let incoming = std::mem::take(&mut a.offsets)
                    .into_iter()
                    .map(|o| (o.key.clone(), o));
                if a.offsets_delta && held.generation != a.offsets_generation {
                    // A delta against offsets this leaf does not hold (it answers a request
                    // built before the last merge): unusable. Keep what is held, and ask for
                    // the whole set next time.
                    held.generation = u64::MAX;
                    held.batch_id = 0;
                } else {
                    if a.offsets_delta {
                        held.offsets.extend(incoming);
                    } else {
                        held.offsets = incoming.collect();
                    }
                    held.generation = a.offsets_generation;
                    held.batch_id = a.offsets_batch_id;
                }
            }
            a.offsets = held.offsets.values().cloned().collect();
            a.offsets_delta = false;
        }
        self.pipelines.retain(|id, _| merged.contains_key(id));
    }

    /// What to tell the master this leaf holds.
    pub fn seen(&self) -> Vec<proto::OffsetsSeen> {
        self.pipelines
            .iter()
            .map(|(id, h)| proto::OffsetsSeen {
                pipeline_id: *id,
                generation: h.generation,
                batch_id: h.batch_id,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets from `key=value` pairs.
    fn offsets(pairs: &[(&str, i64)]) -> Vec<proto::SourceOffset> {
        pairs
            .iter()
            .map(|(k, v)| proto::SourceOffset {
                key: k.to_string(),
                value_json: v.to_string(),
                finished: false,
            })
            .collect()
    }

    fn assignment(
        pairs: &[(&str, i64)],
        delta: bool,
        generation: u64,
        batch_id: u64,
    ) -> proto::TaskAssignment {
        proto::TaskAssignment {
            pipeline_id: 1,
            offsets: offsets(pairs),
            offsets_delta: delta,
            offsets_generation: generation,
            offsets_batch_id: batch_id,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_merge_into_the_whole_set_and_a_new_generation_replaces_it() {
        let mut cache = OffsetCache::default();
        let mut a = vec![assignment(&[("a", 1), ("b", 2)], false, 0, 5)];
        cache.merge(&mut a);
        assert_eq!(a[0].offsets, offsets(&[("a", 1), ("b", 2)]));
        assert_eq!(cache.seen()[0].batch_id, 5);
        // Only b moved: the leaf still gives its tasks both.
        let mut a = vec![
            assignment(&[("b", 3)], true, 0, 6),
            assignment(&[("b", 3)], true, 0, 6),
        ];
        cache.merge(&mut a);
        assert_eq!(a[1].offsets, offsets(&[("a", 1), ("b", 3)]));
        assert!(!a[1].offsets_delta);
        // Nothing moved: the same set.
        let mut a = vec![assignment(&[], true, 0, 6)];
        cache.merge(&mut a);
        assert_eq!(a[0].offsets, offsets(&[("a", 1), ("b", 3)]));
        // ALTER ... SET OFFSETS: a new generation, sent whole, replaces everything.
        let mut a = vec![assignment(&[("c", 0)], false, 1, 6)];
        cache.merge(&mut a);
        assert_eq!(a[0].offsets, offsets(&[("c", 0)]));
        // A delta of another generation than the one held is not merged: what is held stays,
        // and the next heartbeat asks for the whole set.
        let mut a = vec![assignment(&[("d", 0)], true, 2, 7)];
        cache.merge(&mut a);
        assert_eq!(a[0].offsets, offsets(&[("c", 0)]));
        assert_eq!(cache.seen()[0].generation, u64::MAX);
        // A pipeline no longer assigned is forgotten.
        cache.merge(&mut []);
        assert!(cache.seen().is_empty());
    }
}

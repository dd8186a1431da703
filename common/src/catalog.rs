//! The catalog: the Raft state machine every aggregator holds.
//!
//! It holds everything a restart must not lose and nothing that changes per heartbeat.
//! It changes only by [`Catalog::apply`] of a committed [`Command`], which is deterministic:
//! every replica applying the same log reaches the same state (times come in the command).

use crate::error::{Error, Result};
use crate::ids::{LeafId, NodeId};
use crate::variables;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Names that no user database may take.
pub const RESERVED_DATABASES: &[&str] = &["information_schema"];
/// The most partitions one database may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// A leaf as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    pub id: LeafId,
    /// `host:port` of the leaf's gRPC service.
    pub address: String,
    pub online: bool,
    /// When `online` last changed (unix ms).
    pub since_ms: u64,
}

/// One partition of a database and the leaf that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub ordinal: u32,
    pub leaf: LeafId,
}

/// A database and the placement of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub name: String,
    pub partitions: Vec<Partition>,
    pub created_ms: u64,
}

/// The replicated catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    /// Global variables set by users (normalised values); the rest take their defaults.
    pub variables: BTreeMap<String, String>,
    pub databases: BTreeMap<String, Database>,
    pub leaves: BTreeMap<LeafId, Leaf>,
    pub next_leaf_id: u64,
    /// MySQL address (`host:port`) each aggregator serves clients at.
    pub aggregators: BTreeMap<NodeId, String>,
}

/// A change to the catalog, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SetVariable {
        name: String,
        value: String,
    },
    CreateDatabase {
        name: String,
        /// `None`: `default_partitions_per_leaf` x online leaves.
        partitions: Option<u32>,
        if_not_exists: bool,
        now_ms: u64,
    },
    DropDatabase {
        name: String,
        if_exists: bool,
    },
    /// Registers a leaf by address; a leaf that registers again (e.g. after losing its data
    /// directory) gets its old id back.
    RegisterLeaf {
        address: String,
        now_ms: u64,
    },
    SetLeafOnline {
        id: LeafId,
        online: bool,
        now_ms: u64,
    },
    /// An aggregator announces the MySQL address it serves at.
    SetAggregatorAddress {
        node: NodeId,
        mysql_address: String,
    },
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// The change was made.
    Done,
    /// Nothing to do (`IF [NOT] EXISTS`, or already in that state).
    Unchanged,
    /// The id of a registered leaf.
    Leaf(LeafId),
}

impl Catalog {
    /// Applies a committed command. Errors are part of the result, identical on every replica.
    pub fn apply(&mut self, command: Command) -> Result<Output> {
        match command {
            Command::SetVariable { name, value } => {
                let def = variables::lookup(&name)?;
                if def.access == variables::Access::ReadOnly {
                    return Err(Error::ReadOnlyVariable {
                        name: def.name.to_string(),
                    });
                }
                let value = def.normalize(&value)?;
                self.variables.insert(def.name.to_string(), value);
                Ok(Output::Done)
            }
            Command::CreateDatabase {
                name,
                partitions,
                if_not_exists,
                now_ms,
            } => {
                if self.databases.contains_key(&name)
                    || RESERVED_DATABASES.contains(&name.to_ascii_lowercase().as_str())
                {
                    return if if_not_exists {
                        Ok(Output::Unchanged)
                    } else {
                        Err(Error::DatabaseExists { name })
                    };
                }
                let online: Vec<LeafId> = self
                    .leaves
                    .values()
                    .filter(|l| l.online)
                    .map(|l| l.id)
                    .collect();
                if online.is_empty() {
                    return Err(Error::NoLeavesOnline { name });
                }
                let count = match partitions {
                    Some(n) => n,
                    None => self.variable_u32("default_partitions_per_leaf") * online.len() as u32,
                };
                if count == 0 || count > MAX_PARTITIONS {
                    return Err(Error::InvalidPartitionCount {
                        name,
                        count,
                        max: MAX_PARTITIONS,
                    });
                }
                let partitions = (0..count)
                    .map(|ordinal| Partition {
                        ordinal,
                        leaf: online[ordinal as usize % online.len()],
                    })
                    .collect();
                self.databases.insert(
                    name.clone(),
                    Database {
                        name,
                        partitions,
                        created_ms: now_ms,
                    },
                );
                Ok(Output::Done)
            }
            Command::DropDatabase { name, if_exists } => {
                if self.databases.remove(&name).is_some() {
                    Ok(Output::Done)
                } else if if_exists {
                    Ok(Output::Unchanged)
                } else {
                    Err(Error::DatabaseNotFound { name })
                }
            }
            Command::RegisterLeaf { address, now_ms } => {
                if let Some(leaf) = self.leaves.values_mut().find(|l| l.address == address) {
                    if !leaf.online {
                        leaf.online = true;
                        leaf.since_ms = now_ms;
                    }
                    return Ok(Output::Leaf(leaf.id));
                }
                self.next_leaf_id += 1;
                let id = LeafId(self.next_leaf_id);
                self.leaves.insert(
                    id,
                    Leaf {
                        id,
                        address,
                        online: true,
                        since_ms: now_ms,
                    },
                );
                Ok(Output::Leaf(id))
            }
            Command::SetLeafOnline { id, online, now_ms } => {
                let leaf = self
                    .leaves
                    .get_mut(&id)
                    .ok_or(Error::LeafNotFound { id: id.0 })?;
                if leaf.online == online {
                    return Ok(Output::Unchanged);
                }
                leaf.online = online;
                leaf.since_ms = now_ms;
                Ok(Output::Done)
            }
            Command::SetAggregatorAddress {
                node,
                mysql_address,
            } => {
                if self.aggregators.get(&node) == Some(&mysql_address) {
                    return Ok(Output::Unchanged);
                }
                self.aggregators.insert(node, mysql_address);
                Ok(Output::Done)
            }
        }
    }

    /// The global value of a variable: the user's, else the default. `None` if unknown.
    pub fn variable(&self, name: &str) -> Option<String> {
        let def = variables::lookup(name).ok()?;
        Some(
            self.variables
                .get(def.name)
                .cloned()
                .unwrap_or_else(|| def.default.to_string()),
        )
    }

    fn variable_u32(&self, name: &str) -> u32 {
        self.variable(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }

    /// Whether an experimental feature is switched on in `experimental_features_config`.
    pub fn feature_enabled(&self, flag: &str) -> bool {
        self.variable("experimental_features_config")
            .is_some_and(|v| variables::feature_enabled(&v, flag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_leaves(n: u64) -> Catalog {
        let mut c = Catalog::default();
        for i in 0..n {
            c.apply(Command::RegisterLeaf {
                address: format!("127.0.0.1:{}", 9000 + i),
                now_ms: 1,
            })
            .unwrap();
        }
        c
    }

    fn create(name: &str, partitions: Option<u32>) -> Command {
        Command::CreateDatabase {
            name: name.into(),
            partitions,
            if_not_exists: false,
            now_ms: 2,
        }
    }

    #[test]
    fn database_placement_round_robins_over_online_leaves() {
        let mut c = with_leaves(2);
        c.apply(create("d", None)).unwrap();
        let leaves: Vec<u64> = c.databases["d"]
            .partitions
            .iter()
            .map(|p| p.leaf.0)
            .collect();
        assert_eq!(leaves, vec![1, 2, 1, 2]);
        c.apply(Command::SetLeafOnline {
            id: LeafId(2),
            online: false,
            now_ms: 3,
        })
        .unwrap();
        c.apply(create("e", Some(3))).unwrap();
        assert!(c.databases["e"]
            .partitions
            .iter()
            .all(|p| p.leaf == LeafId(1)));
    }

    #[test]
    fn database_errors() {
        let mut c = Catalog::default();
        assert!(matches!(
            c.apply(create("d", None)),
            Err(Error::NoLeavesOnline { .. })
        ));
        let mut c = with_leaves(1);
        c.apply(create("d", Some(1))).unwrap();
        assert!(matches!(
            c.apply(create("d", None)),
            Err(Error::DatabaseExists { .. })
        ));
        assert!(matches!(
            c.apply(create("information_schema", None)),
            Err(Error::DatabaseExists { .. })
        ));
        assert!(matches!(
            c.apply(create("big", Some(MAX_PARTITIONS + 1))),
            Err(Error::InvalidPartitionCount { .. })
        ));
        let again = Command::CreateDatabase {
            name: "d".into(),
            partitions: None,
            if_not_exists: true,
            now_ms: 3,
        };
        assert_eq!(c.apply(again), Ok(Output::Unchanged));
        assert_eq!(
            c.apply(Command::DropDatabase {
                name: "x".into(),
                if_exists: true
            }),
            Ok(Output::Unchanged)
        );
        assert!(matches!(
            c.apply(Command::DropDatabase {
                name: "x".into(),
                if_exists: false
            }),
            Err(Error::DatabaseNotFound { .. })
        ));
    }

    #[test]
    fn leaf_reregistration_keeps_its_id() {
        let mut c = with_leaves(2);
        let again = c
            .apply(Command::RegisterLeaf {
                address: "127.0.0.1:9001".into(),
                now_ms: 5,
            })
            .unwrap();
        assert_eq!(again, Output::Leaf(LeafId(2)));
        assert_eq!(c.leaves.len(), 2);
    }

    #[test]
    fn variables_validate_on_apply() {
        let mut c = Catalog::default();
        assert!(!c.feature_enabled("kafka_connect_enabled"));
        c.apply(Command::SetVariable {
            name: "experimental_features_config".into(),
            value: "kafka_connect_enabled=true".into(),
        })
        .unwrap();
        assert!(c.feature_enabled("kafka_connect_enabled"));
        assert!(c
            .apply(Command::SetVariable {
                name: "version".into(),
                value: "9".into()
            })
            .is_err());
        assert!(c
            .apply(Command::SetVariable {
                name: "no_such".into(),
                value: "9".into()
            })
            .is_err());
        let json = serde_json::to_string(&c).unwrap();
        let back: Catalog = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
    }
}

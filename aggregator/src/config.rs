//! `AggregatorConfig`: command-line flags and environment variables, with documented defaults.

use clap::Parser;
use common::ids::NodeId;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of one aggregator. Every flag can also be given as an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "aggregator", version, about = "Shardline aggregator node")]
pub struct AggregatorConfig {
    /// This aggregator's Raft id; must appear in `--peers`.
    #[arg(long, env = "SHARDLINE_NODE_ID", default_value_t = 1)]
    pub node_id: u64,

    /// Static Raft membership: `id=host:port` of every aggregator's gRPC address, comma-separated.
    /// Empty means a single aggregator whose address is `--grpc-advertise`.
    #[arg(long, env = "SHARDLINE_PEERS", default_value = "")]
    pub peers: String,

    /// Address the gRPC service (Raft, leaves) listens on.
    #[arg(long, env = "SHARDLINE_GRPC_LISTEN", default_value = "127.0.0.1:7001")]
    pub grpc_listen: String,

    /// gRPC address others reach this node at (defaults to `--grpc-listen`).
    #[arg(long, env = "SHARDLINE_GRPC_ADVERTISE")]
    pub grpc_advertise: Option<String>,

    /// Address the MySQL protocol listens on.
    #[arg(long, env = "SHARDLINE_MYSQL_LISTEN", default_value = "127.0.0.1:3306")]
    pub mysql_listen: String,

    /// MySQL address clients reach this node at, shown by SHOW AGGREGATORS (defaults to `--mysql-listen`).
    #[arg(long, env = "SHARDLINE_MYSQL_ADVERTISE")]
    pub mysql_advertise: Option<String>,

    /// Address to serve Prometheus metrics on (`GET /metrics`); off when not given.
    #[arg(long, env = "SHARDLINE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Directory for the Raft log, snapshots and hard state.
    #[arg(long, env = "SHARDLINE_DATA_DIR", default_value = "./data/aggregator")]
    pub data_dir: PathBuf,

    /// Refuse to start unless the data directory is a mounted volume (the container image sets
    /// this, so a container started without its volume fails instead of losing its data).
    #[arg(long, env = "SHARDLINE_REQUIRE_VOLUME")]
    pub require_volume: bool,

    /// Password of the MySQL user `root`. Empty (the default) allows a password-less login.
    #[arg(
        long,
        env = "SHARDLINE_ROOT_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub root_password: String,

    /// A leaf silent for this long is marked offline.
    #[arg(
        long,
        env = "SHARDLINE_LEAF_HEARTBEAT_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub leaf_heartbeat_timeout_ms: u64,

    /// Raft tick. Elections start after 10-20 ticks without a leader; heartbeats go every tick.
    #[arg(long, env = "SHARDLINE_RAFT_TICK_MS", default_value_t = 100)]
    pub raft_tick_ms: u64,

    /// Take a snapshot and compact the Raft log after this many applied entries.
    #[arg(long, env = "SHARDLINE_RAFT_SNAPSHOT_ENTRIES", default_value_t = 1000)]
    pub raft_snapshot_entries: u64,

    /// How long a write waits to be committed through Raft before it fails.
    #[arg(long, env = "SHARDLINE_COMMIT_TIMEOUT_MS", default_value_t = 10_000)]
    pub commit_timeout_ms: u64,
}

/// Why a configuration cannot start a node.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl AggregatorConfig {
    /// A config for tests and embedding: one node, loopback ports chosen by the caller.
    pub fn for_test(data_dir: PathBuf) -> Self {
        Self::parse_from(["aggregator", "--data-dir", &data_dir.to_string_lossy()])
    }

    /// The gRPC address this node advertises.
    pub fn grpc_address(&self) -> String {
        self.grpc_advertise
            .clone()
            .unwrap_or_else(|| self.grpc_listen.clone())
    }

    /// The MySQL address this node advertises.
    pub fn mysql_address(&self) -> String {
        self.mysql_advertise
            .clone()
            .unwrap_or_else(|| self.mysql_listen.clone())
    }

    /// The Raft peers (id -> gRPC address), including this node.
    pub fn peer_map(&self) -> Result<BTreeMap<NodeId, String>, ConfigError> {
        let mut peers = BTreeMap::new();
        if self.peers.trim().is_empty() {
            peers.insert(NodeId(self.node_id), self.grpc_address());
            return Ok(peers);
        }
        for item in self
            .peers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (id, addr) = item.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "peer '{item}' in --peers must look like ID=HOST:PORT"
                ))
            })?;
            let id: u64 = id.trim().parse().map_err(|_| {
                ConfigError(format!(
                    "peer id '{id}' in --peers is not a positive integer"
                ))
            })?;
            if id == 0 {
                return Err(ConfigError("peer id 0 in --peers is reserved".into()));
            }
            let addr = addr.trim();
            check_host_port(addr)
                .map_err(|e| ConfigError(format!("peer {id} address '{addr}': {e}")))?;
            if peers.insert(NodeId(id), addr.to_string()).is_some() {
                return Err(ConfigError(format!(
                    "peer id {id} appears twice in --peers"
                )));
            }
        }
        let Some(own) = peers.get(&NodeId(self.node_id)) else {
            return Err(ConfigError(format!(
                "--node-id {} is not in --peers ({})",
                self.node_id, self.peers
            )));
        };
        if *own != self.grpc_address() {
            return Err(ConfigError(format!(
                "--peers gives node {} the address {own}, but this node's gRPC address is {} (set --grpc-advertise to the address the peers use)",
                self.node_id,
                self.grpc_address()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = peers.values().find(|a| !seen.insert(a.as_str())) {
            return Err(ConfigError(format!(
                "address {dup} appears twice in --peers"
            )));
        }
        Ok(peers)
    }

    /// Checks everything that can be checked before binding ports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError("--node-id must be a positive integer".into()));
        }
        self.peer_map()?;
        for (flag, addr) in [
            ("--grpc-listen", &self.grpc_listen),
            ("--mysql-listen", &self.mysql_listen),
        ] {
            check_host_port(addr).map_err(|e| ConfigError(format!("{flag} '{addr}': {e}")))?;
        }
        if self.raft_tick_ms == 0 || self.leaf_heartbeat_timeout_ms == 0 {
            return Err(ConfigError(
                "--raft-tick-ms and --leaf-heartbeat-timeout-ms must be positive".into(),
            ));
        }
        if self.raft_snapshot_entries < 2 {
            return Err(ConfigError(
                "--raft-snapshot-entries must be at least 2".into(),
            ));
        }
        Ok(())
    }

    pub fn raft_tick(&self) -> Duration {
        Duration::from_millis(self.raft_tick_ms)
    }

    pub fn leaf_heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.leaf_heartbeat_timeout_ms)
    }

    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
}

/// Checks `host:port` syntax (the host may be a name resolved later).
pub fn check_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected HOST:PORT".to_string())?;
    if host.is_empty() {
        return Err("missing host".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("port '{port}' is not a number between 0 and 65535"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> AggregatorConfig {
        let mut all = vec!["aggregator"];
        all.extend_from_slice(args);
        AggregatorConfig::parse_from(all)
    }

    #[test]
    fn peers_parse_and_validate() {
        let c = cfg(&[
            "--node-id",
            "2",
            "--peers",
            "1=a:1,2=b:2,3=c:3",
            "--grpc-advertise",
            "b:2",
        ]);
        c.validate().unwrap();
        assert_eq!(c.peer_map().unwrap().len(), 3);
        // The peers must reach this node where it says it is, and at one address per node.
        let c = cfg(&["--node-id", "2", "--peers", "1=a:1,2=b:2,3=c:3"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("gives node 2 the address b:2"));
        let c = cfg(&[
            "--node-id",
            "1",
            "--peers",
            "1=a:1,2=a:1",
            "--grpc-advertise",
            "a:1",
        ]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("appears twice"));
        for bad in ["1=a:1,1=b:2", "x=a:1", "1=a", "1=a:99999", "0=a:1", "2"] {
            let c = cfg(&["--node-id", "1", "--peers", bad]);
            assert!(c.validate().is_err(), "{bad} should be rejected");
        }
        let c = cfg(&["--node-id", "4", "--peers", "1=a:1,2=b:2"]);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not in --peers"));
        let single = cfg(&["--grpc-listen", "127.0.0.1:9"]);
        assert_eq!(single.peer_map().unwrap()[&NodeId(1)], "127.0.0.1:9");
    }
}

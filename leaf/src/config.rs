//! `LeafConfig`: command-line flags and environment variables, with documented defaults.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of one leaf. Every flag can also be given as an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "leaf", version, about = "Shardline leaf node")]
pub struct LeafConfig {
    /// Address the leaf's gRPC service listens on.
    #[arg(long, env = "SHARDLINE_LEAF_LISTEN", default_value = "127.0.0.1:8001")]
    pub listen: String,

    /// Address aggregators reach this leaf at; it is the leaf's identity in the cluster
    /// (defaults to `--listen`).
    #[arg(long, env = "SHARDLINE_LEAF_ADVERTISE")]
    pub advertise: Option<String>,

    /// gRPC addresses of the aggregators (any subset; the leaf follows the master).
    #[arg(long, env = "SHARDLINE_AGGREGATORS", default_value = "127.0.0.1:7001")]
    pub aggregators: String,

    /// Address to serve Prometheus metrics on (`GET /metrics`); off when not given.
    #[arg(long, env = "SHARDLINE_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Directory for the leaf's partition store.
    #[arg(long, env = "SHARDLINE_DATA_DIR", default_value = "./data/leaf")]
    pub data_dir: PathBuf,

    /// Refuse to start unless the data directory is a mounted volume (the container image sets
    /// this, so a container started without its volume fails instead of losing its data).
    #[arg(long, env = "SHARDLINE_REQUIRE_VOLUME")]
    pub require_volume: bool,

    /// Memory for the partition store's page cache (sled), in MiB: pages recently read or
    /// written stay there; scans of larger tables stream through it.
    #[arg(long, env = "SHARDLINE_STORE_CACHE_MB", default_value_t = 256)]
    pub store_cache_mb: u64,

    /// A partition's committed rows move from the row segment into a column segment once it
    /// holds this many.
    #[arg(long, env = "SHARDLINE_SEGMENT_ROWS", default_value_t = 65_536)]
    pub segment_rows: usize,

    /// How often the leaf checks whether partitions are due for a flush into a column segment.
    #[arg(long, env = "SHARDLINE_FLUSH_INTERVAL_MS", default_value_t = 1000)]
    pub flush_interval_ms: u64,

    /// How often the leaf reports to the master aggregator.
    #[arg(long, env = "SHARDLINE_HEARTBEAT_INTERVAL_MS", default_value_t = 250)]
    pub heartbeat_interval_ms: u64,
}

/// Why a configuration cannot start a leaf.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn check_host_port(addr: &str) -> Result<(), String> {
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

impl LeafConfig {
    pub fn advertise_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.clone())
    }

    pub fn aggregator_addresses(&self) -> Vec<String> {
        self.aggregators
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let aggs = self.aggregator_addresses();
        if aggs.is_empty() {
            return Err(ConfigError("--aggregators lists no address".into()));
        }
        for a in &aggs {
            check_host_port(a).map_err(|e| ConfigError(format!("aggregator '{a}': {e}")))?;
        }
        check_host_port(&self.listen).map_err(|e| ConfigError(format!("--listen: {e}")))?;
        let adv = self.advertise_address();
        check_host_port(&adv).map_err(|e| ConfigError(format!("--advertise '{adv}': {e}")))?;
        if adv.ends_with(":0") {
            return Err(ConfigError(
                "--advertise needs a real port (the leaf's identity); set it when --listen uses port 0"
                    .into(),
            ));
        }
        if self.heartbeat_interval_ms == 0 {
            return Err(ConfigError(
                "--heartbeat-interval-ms must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let ok = LeafConfig::parse_from(["leaf", "--aggregators", "a:1, b:2"]);
        ok.validate().unwrap();
        assert_eq!(ok.aggregator_addresses(), vec!["a:1", "b:2"]);
        for bad in [
            vec!["leaf", "--aggregators", ""],
            vec!["leaf", "--aggregators", "nohost"],
            vec!["leaf", "--listen", "127.0.0.1:0"],
        ] {
            assert!(
                LeafConfig::parse_from(bad.clone()).validate().is_err(),
                "{bad:?}"
            );
        }
    }
}

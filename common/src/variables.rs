//! Engine variables: names, defaults, who may set them, and value validation.
//!
//! Global values set by users live in the catalog (so they persist through Raft and survive a
//! full restart); session values live in the connection. Everything else reads the defaults here.

use crate::error::{Error, Result};

/// The type of a variable's value, which decides how a value is validated and normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer in `[min, max]`.
    Int { min: i64, max: i64 },
    /// `ON`/`OFF` (accepts 1/0, true/false); shown as `ON`/`OFF`.
    Bool,
    /// Free text.
    Str,
    /// `key=value[,key=value]` with known keys (`experimental_features_config`).
    FeatureFlags,
}

/// Who may change a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Only `SET GLOBAL`; persisted in the catalog.
    Global,
    /// `SET` for the session, `SET GLOBAL` for the cluster default.
    Both,
    /// Never.
    ReadOnly,
}

/// One engine variable.
#[derive(Debug, Clone, Copy)]
pub struct VariableDef {
    pub name: &'static str,
    pub default: &'static str,
    pub kind: Kind,
    pub access: Access,
}

const fn def(name: &'static str, default: &'static str, kind: Kind, access: Access) -> VariableDef {
    VariableDef {
        name,
        default,
        kind,
        access,
    }
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Int { min, max }
}

/// The server version reported to clients (MySQL-compatible; drivers parse it).
pub const SERVER_VERSION: &str = "8.0.32-Shardline";
/// The value of `version_comment`, printed by the `mysql` CLI on connect.
pub const VERSION_COMMENT: &str = "Shardline (a SingleStore Kafka Connect Pipelines re-creation)";

/// Known feature flags in `experimental_features_config`.
pub const FEATURE_FLAGS: &[&str] = &["kafka_connect_enabled"];

/// Every variable the engine knows, sorted by name.
pub const VARIABLES: &[VariableDef] = &[
    def("autocommit", "ON", Kind::Bool, Access::Both),
    def("character_set_client", "utf8mb4", Kind::Str, Access::Both),
    def(
        "character_set_connection",
        "utf8mb4",
        Kind::Str,
        Access::Both,
    ),
    def("character_set_database", "utf8mb4", Kind::Str, Access::Both),
    def("character_set_results", "utf8mb4", Kind::Str, Access::Both),
    def("character_set_server", "utf8mb4", Kind::Str, Access::Both),
    def(
        "collation_connection",
        "utf8mb4_bin",
        Kind::Str,
        Access::Both,
    ),
    def("collation_database", "utf8mb4_bin", Kind::Str, Access::Both),
    def("collation_server", "utf8mb4_bin", Kind::Str, Access::Both),
    def(
        "default_partitions_per_leaf",
        "2",
        int(1, 64),
        Access::Global,
    ),
    def(
        "experimental_features_config",
        "",
        Kind::FeatureFlags,
        Access::Global,
    ),
    def(
        "interactive_timeout",
        "28800",
        int(1, 31_536_000),
        Access::Both,
    ),
    def("lower_case_table_names", "0", int(0, 2), Access::ReadOnly),
    def(
        "max_allowed_packet",
        "67108864",
        int(1024, 1_073_741_824),
        Access::ReadOnly,
    ),
    def("net_write_timeout", "60", int(1, 31_536_000), Access::Both),
    def(
        "pipelines_batch_interval",
        "2500",
        int(0, 3_600_000),
        Access::Global,
    ),
    def(
        "pipelines_batches_metadata_to_keep",
        "1000",
        int(1, 1_000_000),
        Access::Global,
    ),
    def(
        "pipelines_extractor_batch_size",
        "1000",
        int(1, 1_000_000),
        Access::Global,
    ),
    def(
        "pipelines_extractor_max_batch_interval_ms",
        "500",
        int(1, 3_600_000),
        Access::Global,
    ),
    def(
        "pipelines_max_retries_per_batch_partition",
        "4",
        int(0, 1000),
        Access::Global,
    ),
    def("pipelines_stop_on_error", "ON", Kind::Bool, Access::Global),
    def(
        "sql_mode",
        "STRICT_ALL_TABLES,NO_AUTO_CREATE_USER",
        Kind::Str,
        Access::Both,
    ),
    def(
        "sql_select_limit",
        "18446744073709551615",
        Kind::Str,
        Access::Both,
    ),
    def("system_time_zone", "UTC", Kind::Str, Access::ReadOnly),
    def("time_zone", "SYSTEM", Kind::Str, Access::Both),
    def(
        "transaction_isolation",
        "READ-COMMITTED",
        Kind::Str,
        Access::Both,
    ),
    def("tx_isolation", "READ-COMMITTED", Kind::Str, Access::Both),
    def("version", SERVER_VERSION, Kind::Str, Access::ReadOnly),
    def(
        "version_comment",
        VERSION_COMMENT,
        Kind::Str,
        Access::ReadOnly,
    ),
    def("wait_timeout", "28800", int(1, 31_536_000), Access::Both),
];

/// Looks a variable up by name, case-insensitively.
pub fn lookup(name: &str) -> Result<&'static VariableDef> {
    VARIABLES
        .iter()
        .find(|v| v.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::UnknownVariable {
            name: name.to_string(),
        })
}

impl VariableDef {
    /// Validates `value` for this variable and returns its normalised form.
    pub fn normalize(&self, value: &str) -> Result<String> {
        let invalid = |reason: &str| Error::InvalidVariableValue {
            name: self.name.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        };
        match self.kind {
            Kind::Int { min, max } => {
                let n: i64 = value
                    .trim()
                    .parse()
                    .map_err(|_| invalid("expected an integer"))?;
                if n < min || n > max {
                    return Err(invalid(&format!("must be between {min} and {max}")));
                }
                Ok(n.to_string())
            }
            Kind::Bool => match value.trim().to_ascii_uppercase().as_str() {
                "ON" | "1" | "TRUE" => Ok("ON".into()),
                "OFF" | "0" | "FALSE" => Ok("OFF".into()),
                _ => Err(invalid("expected ON or OFF")),
            },
            Kind::Str => Ok(value.to_string()),
            Kind::FeatureFlags => normalize_feature_flags(value).map_err(|r| invalid(&r)),
        }
    }
}

fn normalize_feature_flags(value: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| format!("expected key=value, got '{part}'"))?;
        let (key, val) = (key.trim(), val.trim().to_ascii_lowercase());
        if !FEATURE_FLAGS.contains(&key) {
            return Err(format!(
                "unknown feature '{key}' (known: {})",
                FEATURE_FLAGS.join(", ")
            ));
        }
        if val != "true" && val != "false" {
            return Err(format!("feature '{key}' must be true or false"));
        }
        out.push(format!("{key}={val}"));
    }
    Ok(out.join(","))
}

/// Whether `flag` is set to true in an `experimental_features_config` value.
pub fn feature_enabled(config: &str, flag: &str) -> bool {
    config
        .split(',')
        .filter_map(|p| p.split_once('='))
        .any(|(k, v)| k.trim() == flag && v.trim().eq_ignore_ascii_case("true"))
}

/// SQL `LIKE` matching (`%`, `_`, `\` escapes), case-insensitive as MySQL's default collation.
pub fn like_match(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('%', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('_', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some(('\\', rest)) if !rest.is_empty() => {
                !t.is_empty() && chars_eq(rest[0], t[0]) && go(&rest[1..], &t[1..])
            }
            Some((c, rest)) => !t.is_empty() && chars_eq(*c, t[0]) && go(rest, &t[1..]),
        }
    }
    fn chars_eq(a: char, b: char) -> bool {
        a.to_lowercase().eq(b.to_lowercase())
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_sorted_and_defaults_valid() {
        for w in VARIABLES.windows(2) {
            assert!(w[0].name < w[1].name, "{} before {}", w[0].name, w[1].name);
        }
        for v in VARIABLES {
            assert_eq!(
                v.normalize(v.default).as_deref(),
                Ok(v.default),
                "{}",
                v.name
            );
        }
    }

    #[test]
    fn feature_flags() {
        let v = lookup("EXPERIMENTAL_FEATURES_CONFIG").unwrap();
        assert_eq!(
            v.normalize("kafka_connect_enabled=true").unwrap(),
            "kafka_connect_enabled=true"
        );
        assert_eq!(
            v.normalize(" kafka_connect_enabled = TRUE ").unwrap(),
            "kafka_connect_enabled=true"
        );
        assert!(v.normalize("kafka_connect_enabled").is_err());
        assert!(v.normalize("warp_drive=true").is_err());
        assert!(v.normalize("kafka_connect_enabled=maybe").is_err());
        assert!(feature_enabled(
            "kafka_connect_enabled=true",
            "kafka_connect_enabled"
        ));
        assert!(!feature_enabled(
            "kafka_connect_enabled=false",
            "kafka_connect_enabled"
        ));
        assert!(!feature_enabled("", "kafka_connect_enabled"));
    }

    #[test]
    fn ints_and_bools() {
        let v = lookup("pipelines_extractor_batch_size").unwrap();
        assert_eq!(v.normalize("10000").unwrap(), "10000");
        assert!(v.normalize("0").is_err());
        assert!(v.normalize("ten").is_err());
        let b = lookup("pipelines_stop_on_error").unwrap();
        assert_eq!(b.normalize("off").unwrap(), "OFF");
        assert_eq!(b.normalize("1").unwrap(), "ON");
        assert!(b.normalize("sometimes").is_err());
        assert!(matches!(lookup("nope"), Err(Error::UnknownVariable { .. })));
    }

    #[test]
    fn like() {
        assert!(like_match(
            "experimental_features_config",
            "experimental_features_config"
        ));
        assert!(like_match("pipelines%", "pipelines_batch_interval"));
        assert!(like_match("%BATCH%", "pipelines_batch_interval"));
        assert!(like_match("a_c", "abc"));
        assert!(!like_match("a_c", "abbc"));
        assert!(like_match("a\\_c", "a_c"));
        assert!(!like_match("a\\_c", "abc"));
        assert!(!like_match("version", "version_comment"));
    }
}

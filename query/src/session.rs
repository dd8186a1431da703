//! How both ends set DataFusion up: MySQL's dialect and names, Shardline's functions, and the
//! threads queries run on.

use datafusion::prelude::{SessionConfig, SessionContext};

/// The configuration every Shardline query runs with; `default_schema` is the session's
/// database.
pub fn config(default_schema: &str) -> SessionConfig {
    let mut cfg = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(false)
        .with_default_catalog_and_schema("def", default_schema)
        // A leaf's part of a plan is one stream per leaf; splitting it round robin on the
        // aggregator would only stand between the leaves' part and the operators above.
        .with_round_robin_repartition(false);
    let o = cfg.options_mut();
    o.sql_parser.dialect = datafusion::config::Dialect::MySQL;
    o.sql_parser.enable_ident_normalization = false;
    o.sql_parser.map_string_types_to_utf8view = false;
    cfg
}

/// A context with Shardline's functions registered.
pub fn context(cfg: SessionConfig) -> SessionContext {
    with_functions(SessionContext::new_with_config(cfg))
}

/// Registers [`crate::functions::udfs`] in `ctx`.
pub fn with_functions(ctx: SessionContext) -> SessionContext {
    for f in crate::functions::udfs() {
        ctx.register_udf(f);
    }
    ctx
}

/// The runtime queries execute on. DataFusion's operators are CPU work between awaits (seconds
/// for a JSON filter over a big table); on a node's main runtime they would hold up the Raft
/// driver, heartbeats, batch commits and the tasks' reads, and a busy node would look dead.
/// On threads of their own, the OS shares the cores between the two.
pub fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .thread_name("query")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| format!("cannot start query threads: {e}"))
}

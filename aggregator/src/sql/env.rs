//! What a SELECT plans against, kept from one change of the catalog's tables to the next:
//! DataFusion's session state with Shardline's functions and the rule that pushes work to the
//! leaves, the tables of every database (where their partitions live), the plans kept per
//! statement shape ([`PlanCache`]), and `information_schema`, built from the newest catalog the
//! first time a query reads it after the catalog changed. A small query then pays for its own
//! physical planning only, not for copying the catalog, registering hundreds of functions and
//! tables, or optimizing a plan it ran a moment ago with other values ([`QueryEnvs::get`]
//! rebuilds when the tables generation moves; a running pipeline's commits do not move it).

use super::distributed::{planning_context, ClusterTable};
use super::plans::PlanCache;
use super::query::{information_schema, table_schema, Vars};
use crate::raft::{Generations, RaftHandle};
use common::catalog::Catalog;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::SessionState;
use datafusion::execution::TaskContext;
use datafusion::scalar::ScalarValue;
use datafusion::variable::VarType;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The planning environment of one tables generation.
pub struct QueryEnv {
    state: SessionState,
    /// What kept physical plans run in (they need no session: no variable, no database).
    task: std::sync::OnceLock<Arc<TaskContext>>,
    /// Optimized plans by statement shape.
    pub plans: PlanCache,
    counts: Arc<PlanCounts>,
}

/// How often a SELECT's plan was bound from a kept one, and how often planned.
#[derive(Debug, Default)]
pub struct PlanCounts {
    pub reused: AtomicU64,
    pub built: AtomicU64,
    /// Of the reused: those that ran a kept physical plan, planning nothing.
    pub physical: AtomicU64,
}

impl QueryEnv {
    fn build(
        catalog: &Catalog,
        raft: &RaftHandle,
        counts: Arc<PlanCounts>,
    ) -> Result<Self, DataFusionError> {
        let ctx = planning_context("information_schema");
        let def = MemoryCatalogProvider::new();
        let is: Arc<dyn SchemaProvider> = Arc::new(InformationSchema {
            raft: raft.clone(),
            tables: Kept::default(),
        });
        def.register_schema("information_schema", is.clone())?;
        def.register_schema("INFORMATION_SCHEMA", is)?;
        for db in catalog.databases.values() {
            let mut leaves: HashMap<u64, (String, bool, Vec<u32>)> = HashMap::new();
            for p in &db.partitions {
                if let Some(l) = catalog.leaves.get(&p.leaf) {
                    leaves
                        .entry(l.id.0)
                        .or_insert_with(|| (l.address.clone(), l.online, vec![]))
                        .2
                        .push(p.ordinal);
                }
            }
            let tables = MemorySchemaProvider::new();
            for t in db.tables.values() {
                let provider: Arc<dyn TableProvider> = Arc::new(ClusterTable {
                    database: db.name.clone(),
                    table: t.name.clone(),
                    table_id: t.id,
                    schema: table_schema(t),
                    columns: query::columns::to_proto(&t.columns),
                    indexes: t
                        .indexes
                        .iter()
                        .map(|i| (i.name.clone(), i.column.clone()))
                        .collect(),
                    leaves: leaves.values().cloned().collect(),
                });
                tables.register_table(t.name.clone(), provider)?;
            }
            def.register_schema(&db.name, Arc::new(tables))?;
        }
        ctx.register_catalog("def", Arc::new(def));
        Ok(Self {
            state: ctx.state(),
            task: Default::default(),
            plans: PlanCache::default(),
            counts,
        })
    }

    /// Counts a SELECT's planning: `reused` if its plan came from [`Self::plans`].
    pub fn count(&self, reused: bool) {
        let c = if reused {
            &self.counts.reused
        } else {
            &self.counts.built
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a SELECT that ran a physical plan kept for its shape.
    pub fn count_physical(&self) {
        self.count(true);
        self.counts.physical.fetch_add(1, Ordering::Relaxed);
    }

    /// The context a kept physical plan runs in, made once per environment.
    pub fn task_ctx(&self) -> Arc<TaskContext> {
        self.task.get_or_init(|| self.state.task_ctx()).clone()
    }

    /// The state of one statement, made when first asked for.
    pub fn statement_state<'a>(
        &'a self,
        default_db: &'a str,
        vars: HashMap<String, ScalarValue>,
    ) -> StatementState<'a> {
        StatementState {
            env: self,
            default_db,
            vars: Some(vars),
            state: None,
        }
    }

    /// The state one query plans and runs in: the shared state (cloned once) with the
    /// session's database and variables.
    fn state(&self, default_db: &str, vars: HashMap<String, ScalarValue>) -> SessionState {
        let mut state = self.state.clone();
        state.config_mut().options_mut().catalog.default_schema = default_db.to_string();
        state
            .execution_props_mut()
            .add_var_provider(VarType::System, Arc::new(Vars(vars)));
        state
    }
}

/// A statement's planning state ([`QueryEnv::state`]), made the first time it is needed: a
/// statement that runs a kept physical plan needs none.
pub struct StatementState<'a> {
    env: &'a QueryEnv,
    default_db: &'a str,
    vars: Option<HashMap<String, ScalarValue>>,
    state: Option<SessionState>,
}

impl StatementState<'_> {
    pub fn get(&mut self) -> &SessionState {
        let (env, db, vars) = (self.env, self.default_db, &mut self.vars);
        self.state
            .get_or_insert_with(|| env.state(db, vars.take().unwrap_or_default()))
    }
}

/// The environment of the newest tables generation a query has seen on this aggregator.
#[derive(Default)]
pub struct QueryEnvs {
    env: Kept<QueryEnv>,
    counts: Arc<PlanCounts>,
}

impl QueryEnvs {
    /// The environment of the catalog as this node has applied it now.
    pub fn get(&self, raft: &RaftHandle) -> Result<Arc<QueryEnv>, DataFusionError> {
        self.env.get(
            raft,
            |g| g.tables,
            |catalog| QueryEnv::build(catalog, raft, self.counts.clone()),
        )
    }

    /// SELECTs planned from a kept plan, planned in full, and (of the first) run from a kept
    /// physical plan, since this node started.
    pub fn plan_counts(&self) -> (u64, u64, u64) {
        (
            self.counts.reused.load(Ordering::Relaxed),
            self.counts.built.load(Ordering::Relaxed),
            self.counts.physical.load(Ordering::Relaxed),
        )
    }
}

/// A value derived from the catalog, kept until the generation it was built from moves on
/// (one of [`Generations`], chosen by the keeper's user); built from a copy of the newest
/// catalog, outside its lock, by the first reader that finds it out of date.
struct Kept<T> {
    slot: Mutex<Option<(u64, Arc<T>)>>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<T> Kept<T> {
    fn get(
        &self,
        raft: &RaftHandle,
        generation: impl FnOnce(Generations) -> u64,
        build: impl FnOnce(&Catalog) -> Result<T, DataFusionError>,
    ) -> Result<Arc<T>, DataFusionError> {
        let lock = || self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let cached = lock().clone();
        let (generation, snapshot) = raft.read_catalog_generation(|c, g| {
            let g = generation(g);
            match &cached {
                Some((built, _)) if *built == g => (g, None),
                _ => (g, Some(c.clone())),
            }
        });
        let Some(catalog) = snapshot else {
            return Ok(cached.expect("a value of this generation").1);
        };
        let value = Arc::new(build(&catalog)?);
        let mut slot = lock();
        // Another reader may have built a newer one meanwhile.
        if slot.as_ref().is_none_or(|(g, _)| *g < generation) {
            *slot = Some((generation, value.clone()));
        }
        Ok(value)
    }
}

type Tables = HashMap<String, Arc<dyn TableProvider>>;

/// `information_schema`, built from the catalog when a query first reads one of its tables
/// after the catalog changed (any change: a pipeline's state and batches are in it).
struct InformationSchema {
    raft: RaftHandle,
    tables: Kept<Tables>,
}

impl std::fmt::Debug for InformationSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InformationSchema")
    }
}

impl InformationSchema {
    fn tables(&self) -> Result<Arc<Tables>, DataFusionError> {
        self.tables.get(
            &self.raft,
            |g| g.all,
            |catalog| {
                let built = information_schema(catalog)
                    .map_err(|e| DataFusionError::Execution(format!("information_schema: {e}")))?;
                Ok(built
                    .into_iter()
                    .flat_map(|(n, t)| [(n.to_string(), t.clone()), (n.to_ascii_lowercase(), t)])
                    .collect())
            },
        )
    }
}

#[async_trait::async_trait]
impl SchemaProvider for InformationSchema {
    fn table_names(&self) -> Vec<String> {
        self.tables()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        Ok(self.tables()?.get(name).cloned())
    }

    fn table_exist(&self, name: &str) -> bool {
        self.tables().is_ok_and(|t| t.contains_key(name))
    }
}

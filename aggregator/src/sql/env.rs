//! What a SELECT plans against, kept from one catalog change to the next: DataFusion's session
//! state with Shardline's functions and the rule that pushes work to the leaves, the tables of
//! every database (where their partitions live), and `information_schema`, built from the same
//! catalog snapshot the first time a query reads it. A small query then pays for its own
//! planning only, not for copying the catalog and registering hundreds of functions and
//! tables ([`QueryEnvs::get`] rebuilds when the catalog's generation moves).

use super::distributed::{planning_context, ClusterTable};
use super::query::{information_schema, table_schema, Vars};
use crate::raft::RaftHandle;
use common::catalog::Catalog;
use datafusion::catalog::{
    CatalogProvider, MemoryCatalogProvider, MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::error::DataFusionError;
use datafusion::execution::session_state::SessionState;
use datafusion::scalar::ScalarValue;
use datafusion::variable::VarType;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The planning environment of one catalog generation.
pub struct QueryEnv {
    generation: u64,
    state: SessionState,
}

impl QueryEnv {
    fn build(generation: u64, catalog: Arc<Catalog>) -> Result<Self, DataFusionError> {
        let ctx = planning_context("information_schema");
        let def = MemoryCatalogProvider::new();
        let is: Arc<dyn SchemaProvider> = Arc::new(InformationSchema {
            catalog: catalog.clone(),
            tables: OnceLock::new(),
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
            generation,
            state: ctx.state(),
        })
    }

    /// The state one query plans and runs in: the shared state (cloned once) with the
    /// session's database and variables.
    pub fn state(&self, default_db: &str, vars: HashMap<String, ScalarValue>) -> SessionState {
        let mut state = self.state.clone();
        state.config_mut().options_mut().catalog.default_schema = default_db.to_string();
        state
            .execution_props_mut()
            .add_var_provider(VarType::System, Arc::new(Vars(vars)));
        state
    }
}

/// The environment of the newest catalog generation a query has seen on this aggregator.
#[derive(Default)]
pub struct QueryEnvs(Mutex<Option<Arc<QueryEnv>>>);

impl QueryEnvs {
    /// The environment of the catalog as this node has applied it now.
    pub fn get(&self, raft: &RaftHandle) -> Result<Arc<QueryEnv>, DataFusionError> {
        let cached = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (generation, snapshot) = raft.read_catalog_generation(|c, g| match &cached {
            Some(env) if env.generation == g => (g, None),
            _ => (g, Some(Arc::new(c.clone()))),
        });
        let Some(catalog) = snapshot else {
            return Ok(cached.expect("a cached environment of this generation"));
        };
        let env = Arc::new(QueryEnv::build(generation, catalog)?);
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|e| e.generation < generation) {
            *slot = Some(env.clone());
        }
        Ok(env)
    }
}

type Tables = HashMap<String, Arc<dyn TableProvider>>;

/// `information_schema` of one catalog snapshot, its tables built when a query first reads
/// one of them.
#[derive(Debug)]
struct InformationSchema {
    catalog: Arc<Catalog>,
    tables: OnceLock<Result<Tables, String>>,
}

impl InformationSchema {
    fn tables(&self) -> Result<&Tables, DataFusionError> {
        self.tables
            .get_or_init(|| {
                let built = information_schema(&self.catalog).map_err(|e| e.to_string())?;
                Ok(built
                    .into_iter()
                    .flat_map(|(n, t)| [(n.to_string(), t.clone()), (n.to_ascii_lowercase(), t)])
                    .collect())
            })
            .as_ref()
            .map_err(|e| DataFusionError::Execution(format!("information_schema: {e}")))
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

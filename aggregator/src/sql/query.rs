//! SELECT on Apache DataFusion: the aggregator plans; tables are scanned on the leaves that
//! hold their partitions; `information_schema` tables are built from the catalog.

use super::env::QueryEnv;
use super::exec::{Session, SqlEngine};
use super::plans::Planned;
use super::result::{codes, Column, ColumnKind, QueryOutput, RowStream, SqlError, Value};
use common::catalog::tables::Table;
use common::catalog::Catalog;
use datafusion::arrow::array::{
    ArrayRef, BinaryArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::scalar::ScalarValue;
use datafusion::sql::sqlparser::ast::{Ident, Query, SelectItem, SetExpr};
use datafusion::variable::VarProvider;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

/// Field metadata key telling the MySQL layer a text column is JSON.
pub use common::arrow::MYSQL_TYPE;

fn df_err(e: DataFusionError) -> SqlError {
    let root = e.find_root();
    let msg = root.to_string();
    let msg = msg
        .strip_prefix("Error during planning: ")
        .unwrap_or(&msg)
        .to_string();
    let code = match root {
        DataFusionError::SchemaError(..) => 1054,
        DataFusionError::Plan(m) if m.contains("not found") => 1146,
        DataFusionError::SQL(..) => codes::PARSE,
        DataFusionError::NotImplemented(_) => codes::NOT_SUPPORTED_YET,
        _ => codes::UNKNOWN,
    };
    SqlError::new(code, msg)
}

/// A UTC `YYYY-MM-DD HH:MM:SS` from unix milliseconds.
pub fn datetime(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Builds a record batch from rows of [`Value`]s.
pub fn batch(schema: &SchemaRef, rows: &[Vec<Value>]) -> Result<RecordBatch, DataFusionError> {
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let cell = |r: &Vec<Value>| r.get(i).cloned().unwrap_or(Value::Null);
        let col: ArrayRef = match f.data_type() {
            DataType::Int64 => Arc::new(
                rows.iter()
                    .map(|r| match cell(r) {
                        Value::Int(v) => Some(v),
                        Value::Double(d) => Some(d as i64),
                        Value::Text(t) => t.parse().ok(),
                        _ => None,
                    })
                    .collect::<Int64Array>(),
            ),
            DataType::Float64 => Arc::new(
                rows.iter()
                    .map(|r| match cell(r) {
                        Value::Int(v) => Some(v as f64),
                        Value::Double(d) => Some(d),
                        Value::Text(t) => t.parse().ok(),
                        _ => None,
                    })
                    .collect::<Float64Array>(),
            ),
            DataType::Binary => Arc::new(
                rows.iter()
                    .map(|r| match cell(r) {
                        Value::Bytes(b) => Some(b),
                        Value::Text(t) => Some(t.into_bytes()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .iter()
                    .map(|v| v.as_deref())
                    .collect::<BinaryArray>(),
            ),
            _ => Arc::new(
                rows.iter()
                    .map(|r| cell(r).to_text())
                    .collect::<StringArray>(),
            ),
        };
        cols.push(col);
    }
    RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| DataFusionError::ArrowError(Box::new(e), None))
}

fn text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn json_field(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true).with_metadata(HashMap::from([(
        MYSQL_TYPE.to_string(),
        "json".to_string(),
    )]))
}

fn int(name: &str) -> Field {
    Field::new(name, DataType::Int64, true)
}

fn double(name: &str) -> Field {
    Field::new(name, DataType::Float64, true)
}

fn mem_table(
    fields: Vec<Field>,
    rows: Vec<Vec<Value>>,
) -> Result<Arc<dyn TableProvider>, DataFusionError> {
    let schema = Arc::new(Schema::new(fields));
    let b = batch(&schema, &rows)?;
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![b]])?))
}

/// A table provider and the name it is registered under.
type NamedTable = (&'static str, Arc<dyn TableProvider>);

/// The `information_schema` tables, from a catalog snapshot.
pub(super) fn information_schema(c: &Catalog) -> Result<Vec<NamedTable>, DataFusionError> {
    let mut pipelines = Vec::new();
    let mut offsets = Vec::new();
    let mut batches = Vec::new();
    let mut errors = Vec::new();
    let batch_interval = c.variable_u32("pipelines_batch_interval");
    for p in c.pipelines.values() {
        let config = serde_json::json!({
            "name": p.name,
            "source_type": "KAFKACONNECT",
            "connector": p.connector,
            "connector_config": serde_json::Value::Object(common::catalog::pipelines::redacted_config(&p.config)),
            "credentials": "<CREDENTIALS REDACTED>",
            "format": "AVRO",
            "table": p.table,
            "batch_interval": p.batch_interval_ms.unwrap_or(u64::from(batch_interval)),
            "running": p.state == common::catalog::pipelines::PipelineState::Running,
        });
        pipelines.push(vec![
            Value::Text(p.database.clone()),
            Value::Text(p.name.clone()),
            Value::Int(p.id as i64),
            Value::Text(common::connect::avro::canonical_json(&config)),
            Value::Text(p.state.as_str().into()),
            Value::Int(p.skipped_batch_partitions as i64),
            Value::Text(datetime(p.created_ms)),
            Value::Text(datetime(p.altered_ms)),
        ]);
        for (key, o) in &p.offsets {
            offsets.push(vec![
                Value::Text(p.database.clone()),
                Value::Text(p.name.clone()),
                Value::Int(o.batch_id as i64),
                Value::Int(i64::from(o.task_id)),
                Value::Text(key.clone()),
                Value::Text(common::connect::avro::canonical_json(&o.value)),
            ]);
        }
        for b in &p.batches {
            let secs = b.batch_time_ms as f64 / 1000.0;
            let mb = b.bytes as f64 / 1_048_576.0;
            let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
            batches.push(vec![
                Value::Text(p.database.clone()),
                Value::Text(p.name.clone()),
                Value::Int(b.batch_id as i64),
                Value::Text(if b.succeeded { "Succeeded" } else { "Failed" }.into()),
                Value::Text(datetime(b.start_ms)),
                Value::Double(b.extractor_wait_ms as f64 / 1000.0),
                Value::Double(secs),
                Value::Int(b.rows as i64),
                Value::Double(per_sec(b.rows as f64)),
                Value::Double(mb),
                Value::Double(per_sec(mb)),
                Value::Int(i64::from(b.num_partitions)),
            ]);
        }
        for e in &p.errors {
            errors.push(vec![
                Value::Text(p.database.clone()),
                Value::Text(p.name.clone()),
                Value::Double(e.unix_ms as f64 / 1000.0),
                Value::Text(e.error_type.clone()),
                Value::Int(i64::from(e.code)),
                Value::Text(e.message.clone()),
                e.batch_id.map_or(Value::Null, |b| Value::Int(b as i64)),
                Value::Int(e.error_id as i64),
                Value::Text(e.host.clone()),
                e.port.map_or(Value::Null, |p| Value::Int(i64::from(p))),
                e.partition.clone().map_or(Value::Null, Value::Text),
            ]);
        }
    }
    let mut tables = Vec::new();
    let mut columns = Vec::new();
    for db in c.databases.values() {
        for t in db.tables.values() {
            tables.push(vec![
                Value::Text("def".into()),
                Value::Text(db.name.clone()),
                Value::Text(t.name.clone()),
                Value::Text("BASE TABLE".into()),
            ]);
            for (i, col) in t.columns.iter().enumerate() {
                columns.push(vec![
                    Value::Text("def".into()),
                    Value::Text(db.name.clone()),
                    Value::Text(t.name.clone()),
                    Value::Text(col.name.clone()),
                    Value::Int(i as i64 + 1),
                    Value::Text(if col.nullable { "YES" } else { "NO" }.into()),
                    Value::Text(col.ty.to_string()),
                    Value::Text(
                        if col.computed.is_some() {
                            "computed"
                        } else {
                            ""
                        }
                        .into(),
                    ),
                ]);
            }
        }
    }
    let segments = |view| super::columnar::ColumnarSegments {
        view,
        leaves: c
            .leaves
            .values()
            .filter(|l| l.online)
            .map(|l| l.address.clone())
            .collect(),
        tables: c
            .databases
            .values()
            .flat_map(|db| {
                db.tables
                    .values()
                    .map(|t| (t.id, (db.name.clone(), t.name.clone())))
            })
            .collect(),
    };
    use super::columnar::SegmentView;
    Ok(vec![
        (
            "COLUMNAR_SEGMENTS",
            Arc::new(segments(SegmentView::Columns)),
        ),
        (
            "JSON_COLUMN_SCHEMA",
            Arc::new(segments(SegmentView::JsonPaths)),
        ),
        (
            "PIPELINES",
            mem_table(
                vec![
                    text("DATABASE_NAME"),
                    text("PIPELINE_NAME"),
                    int("PIPELINE_ID"),
                    json_field("CONFIG_JSON"),
                    text("STATE"),
                    int("SKIPPED_BATCH_PARTITIONS"),
                    text("CREATE_TIME"),
                    text("ALTER_TIME"),
                ],
                pipelines,
            )?,
        ),
        (
            "PIPELINES_SOURCE_OFFSETS",
            mem_table(
                vec![
                    text("DATABASE_NAME"),
                    text("PIPELINE_NAME"),
                    int("BATCH_ID"),
                    int("TASK_ID"),
                    json_field("KEY"),
                    json_field("VALUE"),
                ],
                offsets,
            )?,
        ),
        (
            "PIPELINES_BATCHES_SUMMARY",
            mem_table(
                vec![
                    text("DATABASE_NAME"),
                    text("PIPELINE_NAME"),
                    int("BATCH_ID"),
                    text("BATCH_STATE"),
                    text("START_TIME"),
                    double("EXTRACTOR_WAIT_TIME"),
                    double("BATCH_TIME"),
                    int("ROWS_STREAMED"),
                    double("ROWS_PER_SEC"),
                    double("MB_STREAMED"),
                    double("MB_PER_SEC"),
                    int("NUM_PARTITIONS"),
                ],
                batches,
            )?,
        ),
        (
            "PIPELINES_ERRORS",
            mem_table(
                vec![
                    text("DATABASE_NAME"),
                    text("PIPELINE_NAME"),
                    double("ERROR_UNIX_TIMESTAMP"),
                    text("ERROR_TYPE"),
                    int("ERROR_CODE"),
                    text("ERROR_MESSAGE"),
                    int("BATCH_ID"),
                    int("ERROR_ID"),
                    text("HOST"),
                    int("PORT"),
                    text("PARTITION"),
                ],
                errors,
            )?,
        ),
        (
            "TABLES",
            mem_table(
                vec![
                    text("TABLE_CATALOG"),
                    text("TABLE_SCHEMA"),
                    text("TABLE_NAME"),
                    text("TABLE_TYPE"),
                ],
                tables,
            )?,
        ),
        (
            "COLUMNS",
            mem_table(
                vec![
                    text("TABLE_CATALOG"),
                    text("TABLE_SCHEMA"),
                    text("TABLE_NAME"),
                    text("COLUMN_NAME"),
                    int("ORDINAL_POSITION"),
                    text("IS_NULLABLE"),
                    text("COLUMN_TYPE"),
                    text("EXTRA"),
                ],
                columns,
            )?,
        ),
    ])
}

/// The Arrow schema of a table.
pub fn table_schema(t: &Table) -> SchemaRef {
    common::arrow::table_schema(&t.columns)
}

/// `@@variables` for DataFusion, from a snapshot.
#[derive(Debug)]
pub(super) struct Vars(pub(super) HashMap<String, ScalarValue>);

impl VarProvider for Vars {
    fn get_value(&self, names: Vec<String>) -> Result<ScalarValue, DataFusionError> {
        let key = names
            .last()
            .cloned()
            .unwrap_or_default()
            .trim_start_matches('@')
            .to_ascii_lowercase();
        self.0
            .get(&key)
            .cloned()
            .ok_or_else(|| DataFusionError::Plan(format!("Unknown system variable '{key}'")))
    }

    fn get_type(&self, names: &[String]) -> Option<DataType> {
        let key = names.last()?.trim_start_matches('@').to_ascii_lowercase();
        self.0.get(&key).map(ScalarValue::data_type)
    }
}

/// Runs a SELECT on the query runtime and streams its rows: the result holds the first rows
/// (so an error before any row is a plain error), the rest follow as the leaves send them. A
/// dropped result (the client went away) stops the query.
pub async fn run(
    engine: &SqlEngine,
    session: &Session,
    query: &Query,
    vars: HashMap<String, ScalarValue>,
) -> Result<QueryOutput, SqlError> {
    let env = engine.query_envs().get(engine.raft()).map_err(df_err)?;
    let default_db = session
        .database
        .clone()
        .unwrap_or_else(|| "information_schema".into());
    let (columns_tx, columns_rx) = tokio::sync::oneshot::channel();
    let (rows_tx, rows_rx) = tokio::sync::mpsc::channel(2);
    let query = query.clone();
    let failed = rows_tx.clone();
    let work = async move {
        let mut stream = match execute(env, default_db, query, vars).await {
            Ok(s) => s,
            Err(e) => {
                let _ = columns_tx.send(Err(e));
                return;
            }
        };
        if columns_tx.send(Ok(columns_of(&stream.schema()))).is_err() {
            return;
        }
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(df_err);
            let failed = batch.is_err();
            if batch.as_ref().is_ok_and(|b| b.num_rows() == 0) {
                continue;
            }
            if rows_tx.send(batch).await.is_err() || failed {
                return;
            }
        }
    };
    let job = query::session::runtime()
        .map_err(|e| SqlError::new(codes::UNKNOWN, e))?
        .spawn(async move {
            // A panic is an error the client sees, never a result cut short.
            let run = std::panic::AssertUnwindSafe(work);
            if futures::FutureExt::catch_unwind(run).await.is_err() {
                let _ = failed
                    .send(Err(SqlError::new(
                        codes::UNKNOWN,
                        "the query failed on the aggregator (an internal error; see its log)",
                    )))
                    .await;
            }
        });
    let job = tokio_util::task::AbortOnDropHandle::new(job);
    let columns = columns_rx
        .await
        .map_err(|_| SqlError::new(codes::UNKNOWN, "the query stopped"))??;
    let mut rows = RowStream::new(columns, rows_rx, job);
    rows.prefetch().await?;
    Ok(QueryOutput::Stream(rows))
}

/// Plans and executes a SELECT in `env` (the catalog as of its generation).
async fn execute(
    env: Arc<QueryEnv>,
    default_db: String,
    query: Query,
    vars: HashMap<String, ScalarValue>,
) -> Result<SendableRecordBatchStream, SqlError> {
    // MySQL names an unaliased expression column by its text.
    let mut query = query;
    if let SetExpr::Select(select) = query.body.as_mut() {
        for item in select.projection.iter_mut() {
            if let SelectItem::UnnamedExpr(e) = item {
                if !matches!(
                    e,
                    datafusion::sql::sqlparser::ast::Expr::Identifier(_)
                        | datafusion::sql::sqlparser::ast::Expr::CompoundIdentifier(_)
                ) {
                    let alias = Ident::with_quote('`', e.to_string());
                    *item = SelectItem::ExprWithAlias {
                        expr: e.clone(),
                        alias,
                    };
                }
            }
        }
    }
    let mut state = env.statement_state(&default_db, vars);
    let planned = env
        .plans
        .plan(&mut state, &default_db, &query)
        .await
        .map_err(df_err)?;
    let (plan, reused) = match planned {
        Planned::Physical(physical, reused) => {
            if reused {
                env.count_physical();
            } else {
                env.count(false);
            }
            return datafusion::physical_plan::execute_stream(physical, env.task_ctx())
                .map_err(df_err);
        }
        Planned::Logical(plan, reused) => (plan, reused),
    };
    env.count(reused);
    let state = state.get();
    // Optimized already (or bound into a plan optimized once for its shape).
    let physical = state
        .query_planner()
        .create_physical_plan(&plan, state)
        .await
        .map_err(df_err)?;
    datafusion::physical_plan::execute_stream(physical, state.task_ctx()).map_err(df_err)
}

/// The result columns of a schema, typed as MySQL clients see them.
fn columns_of(schema: &SchemaRef) -> Vec<Column> {
    schema
        .fields()
        .iter()
        .map(|f| Column {
            name: f.name().clone(),
            kind: match f.data_type() {
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64
                | DataType::Boolean => ColumnKind::BigInt,
                DataType::Float16
                | DataType::Float32
                | DataType::Float64
                | DataType::Decimal128(..) => ColumnKind::Double,
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => ColumnKind::Blob,
                DataType::Null => ColumnKind::Null,
                _ if f.metadata().get(MYSQL_TYPE).is_some_and(|t| t == "json") => ColumnKind::Json,
                _ => ColumnKind::Text,
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(1_775_700_271_554), "2026-04-09 02:04:31");
    }
}

//! `information_schema.COLUMNAR_SEGMENTS` and `JSON_COLUMN_SCHEMA`: the column segments on the
//! leaves and the JSON key paths each keeps as sub-columns, asked for when a query reads the
//! table (not with every query, as the catalog's tables are).

use super::query::batch;
use super::result::Value;
use crate::cluster::leaf_client;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::datasource::memory::{DataSourceExec, MemorySourceConfig};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long one leaf may take to list its segments.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Which of the two tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentView {
    /// One row per column of each segment.
    Columns,
    /// One row per JSON key path each segment keeps as a sub-column.
    JsonPaths,
}

/// The segments on each online leaf.
#[derive(Debug)]
pub struct ColumnarSegments {
    pub view: SegmentView,
    /// Online leaves' addresses.
    pub leaves: Vec<String>,
    /// Table id -> (database, table).
    pub tables: HashMap<u64, (String, String)>,
}

impl ColumnarSegments {
    fn schema(&self) -> SchemaRef {
        let text = |n: &str| Field::new(n, DataType::Utf8, true);
        let int = |n: &str| Field::new(n, DataType::Int64, true);
        if self.view == SegmentView::JsonPaths {
            return Arc::new(Schema::new(vec![
                text("DATABASE_NAME"),
                text("TABLE_NAME"),
                int("ORDINAL"),
                int("SEGMENT_ID"),
                text("COLUMN_NAME"),
                text("KEY_PATH"),
                text("TYPE"),
                int("ROWS_COUNT"),
                int("PRESENT_COUNT"),
                text("NODE"),
            ]));
        }
        Arc::new(Schema::new(vec![
            text("DATABASE_NAME"),
            text("TABLE_NAME"),
            int("ORDINAL"),
            int("SEGMENT_ID"),
            text("COLUMN_NAME"),
            int("ROWS_COUNT"),
            int("COMPRESSED_SIZE"),
            text("MIN_VALUE"),
            text("MAX_VALUE"),
            int("NULL_COUNT"),
            text("NODE"),
        ]))
    }
}

#[async_trait::async_trait]
impl TableProvider for ColumnarSegments {
    fn schema(&self) -> SchemaRef {
        ColumnarSegments::schema(self)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn DfSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let calls = self.leaves.iter().map(|addr| async move {
            let mut c = leaf_client::query_client(addr).map_err(DataFusionError::Execution)?;
            let listed = tokio::time::timeout(LIST_TIMEOUT, c.segments(proto::SegmentsRequest {}))
                .await
                .map_err(|_| {
                    DataFusionError::Execution(format!("leaf {addr} did not list its segments"))
                })?
                .map_err(|s| {
                    DataFusionError::Execution(format!(
                        "leaf {addr} did not list its segments: {}",
                        s.message()
                    ))
                })?;
            Ok::<_, DataFusionError>((addr.clone(), listed.into_inner().segments))
        });
        let mut rows = Vec::new();
        for listed in futures::future::join_all(calls).await {
            let (addr, segments) = listed?;
            for s in segments {
                let (db, table) = self
                    .tables
                    .get(&s.table_id)
                    .cloned()
                    .unwrap_or_else(|| (String::new(), s.tree.clone()));
                if self.view == SegmentView::JsonPaths {
                    for j in &s.json {
                        rows.push(vec![
                            Value::Text(db.clone()),
                            Value::Text(table.clone()),
                            Value::Int(i64::from(s.partition)),
                            Value::Int(s.segment_id as i64),
                            Value::Text(j.column.clone()),
                            Value::Text(j.path.join(".")),
                            Value::Text(j.r#type.clone()),
                            Value::Int(s.rows as i64),
                            Value::Int(j.present as i64),
                            Value::Text(addr.clone()),
                        ]);
                    }
                    continue;
                }
                // The table's columns (sub-columns and the row id have reserved names).
                for c in s.columns.iter().filter(|c| !c.name.starts_with('\0')) {
                    let json = |v: &Option<String>| {
                        v.as_deref().map_or(Value::Null, |j| {
                            Value::Text(match serde_json::from_str::<serde_json::Value>(j) {
                                Ok(serde_json::Value::String(s)) => s,
                                _ => j.to_string(),
                            })
                        })
                    };
                    rows.push(vec![
                        Value::Text(db.clone()),
                        Value::Text(table.clone()),
                        Value::Int(i64::from(s.partition)),
                        Value::Int(s.segment_id as i64),
                        Value::Text(c.name.clone()),
                        Value::Int(s.rows as i64),
                        Value::Int(s.bytes as i64),
                        json(&c.min_json),
                        json(&c.max_json),
                        Value::Int(c.nulls as i64),
                        Value::Text(addr.clone()),
                    ]);
                }
            }
        }
        let schema = ColumnarSegments::schema(self);
        let b = batch(&schema, &rows)?;
        let src = MemorySourceConfig::try_new(&[vec![b]], schema, projection.cloned())?;
        Ok(DataSourceExec::from_data_source(src))
    }
}

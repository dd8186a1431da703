//! The leaf's part of queries: the aggregator sends a plan fragment (DataFusion physical plan,
//! datafusion-proto bytes); the leaf runs it over its store and streams the result back, a
//! record batch per message, while the aggregator reads (a bounded channel: a slow reader
//! slows the scan, a gone one stops it).

use crate::store::segments::file::{segment_groups, Segment};
use crate::store::{Range, Store, TableRef};
use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::pruning::{PruningPredicate, PruningPredicateBuilder};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use query::derive::Derived;
use query::scan::ScanSource;
use serde_json::Value as Json;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Most rows in one record batch a scan produces.
pub const BATCH_ROWS: usize = 8192;
/// A scan's record batch ends once its rows' stored JSON reaches this many bytes, so a batch
/// of 1 MiB records stays one record (one gRPC message) rather than gigabytes, and the
/// batches in flight between a leaf and the client stay a few MiB.
pub const BATCH_BYTES: usize = 1024 * 1024;

/// Batches produced ahead of the reader, per scan and per result stream.
const AHEAD: usize = 2;

/// The stream of result messages of a query.
pub type Messages = ReceiverStream<Result<proto::QueryResponse, Status>>;

/// The context every fragment runs in: the leaf's functions, its configuration. Built once:
/// a `TaskContext` copies every registered function's map, a cost per query otherwise.
fn task_context() -> Arc<TaskContext> {
    static TASK: std::sync::OnceLock<Arc<TaskContext>> = std::sync::OnceLock::new();
    TASK.get_or_init(|| {
        query::session::context(query::session::config("information_schema")).task_ctx()
    })
    .clone()
}

type Metrics = Arc<common::metrics::Metrics>;

/// What the leaf's query counters mean: together they show how much of a query's work stayed
/// on the leaf (rows read against rows sent).
pub fn describe_metrics(m: &common::metrics::Metrics) {
    m.describe(
        "shardline_leaf_queries_total",
        "Plan fragments this leaf ran for the aggregators.",
    );
    m.describe(
        "shardline_leaf_scan_rows_total",
        "Committed rows the leaf's scans read from storage.",
    );
    m.describe(
        "shardline_leaf_query_rows_sent_total",
        "Rows the leaf sent back as fragment results (after its filters and aggregates).",
    );
    m.describe(
        "shardline_leaf_segments_skipped_total",
        "Column segments a scan skipped whole by their min/max.",
    );
    m.describe(
        "shardline_leaf_row_groups_skipped_total",
        "Row groups of column segments scans skipped by their min/max.",
    );
    m.describe(
        "shardline_leaf_segments_flushed_total",
        "Column segments written from the row segment.",
    );
    m.describe(
        "shardline_leaf_json_values_from_sub_columns_total",
        "JSON_EXTRACT values scans read from column segments' sub-columns (per value and row).",
    );
    m.describe(
        "shardline_leaf_json_values_computed_total",
        "JSON_EXTRACT values scans computed from the JSON text (rows without a sub-column).",
    );
    m.describe(
        "shardline_leaf_query_bytes_sent_total",
        "Arrow IPC bytes the leaf sent back as fragment results.",
    );
}

/// Starts running a fragment over `store`; its result batches arrive on the returned stream.
pub fn run(plan: &[u8], store: Store, metrics: Metrics) -> Result<Messages, Status> {
    let task = task_context();
    let source: Arc<dyn ScanSource> = Arc::new(StoreSource {
        store,
        metrics: metrics.clone(),
    });
    let plan = query::fragment::decode(plan, &task, source)
        .map_err(|e| Status::invalid_argument(format!("cannot read the query plan: {e}")))?;
    // JSON extractions right above the scans: computed by the scans, from segments'
    // sub-columns where they have them.
    let plan = query::derive::json_columns(plan)
        .and_then(query::scan::attach_filters)
        .map_err(|e| Status::internal(format!("planning the fragment: {e}")))?;
    let runtime = query::session::runtime().map_err(Status::internal)?;
    let (tx, rx) = mpsc::channel(AHEAD);
    metrics.add("shardline_leaf_queries_total", 1.0);
    runtime.spawn(async move {
        let failed = tx.clone();
        let run = std::panic::AssertUnwindSafe(send_results(plan, task, tx, metrics));
        if let Err(panic) = futures::FutureExt::catch_unwind(run).await {
            let _ = failed
                .send(Err(Status::internal(format!(
                    "the query failed on the leaf: {}",
                    panic_message(&panic)
                ))))
                .await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Runs the fragment and sends its batches, then the end marker.
async fn send_results(
    plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    task: Arc<TaskContext>,
    tx: mpsc::Sender<Result<proto::QueryResponse, Status>>,
    metrics: Metrics,
) {
    let mut stream = match datafusion::physical_plan::execute_stream(plan, task) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(query_status(e))).await;
            return;
        }
    };
    while let Some(batch) = stream.next().await {
        let message = batch.map_err(query_status).and_then(|b| {
            common::arrow::encode_ipc(&b)
                .map(|arrow_ipc| {
                    metrics.add("shardline_leaf_query_rows_sent_total", b.num_rows() as f64);
                    metrics.add(
                        "shardline_leaf_query_bytes_sent_total",
                        arrow_ipc.len() as f64,
                    );
                    proto::QueryResponse {
                        arrow_ipc,
                        end: false,
                    }
                })
                .map_err(|e| Status::internal(format!("encoding a result batch: {e}")))
        });
        let failed = message.is_err();
        if tx.send(message).await.is_err() || failed {
            return;
        }
    }
    let _ = tx
        .send(Ok(proto::QueryResponse {
            arrow_ipc: vec![],
            end: true,
        }))
        .await;
}

/// What a caught panic says.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

fn query_status(e: DataFusionError) -> Status {
    Status::internal(e.find_root().to_string())
}

/// The leaf's store as the source of [`query::scan::LeafScanExec`].
#[derive(Debug)]
struct StoreSource {
    store: Store,
    metrics: Metrics,
}

impl ScanSource for StoreSource {
    fn scan(
        &self,
        scan: &proto::TableScan,
        derived: &[Derived],
        schema: SchemaRef,
        predicate: Option<Arc<dyn PhysicalExpr>>,
    ) -> Result<SendableRecordBatchStream> {
        let reader = Reader::new(
            scan,
            derived,
            schema.clone(),
            predicate,
            self.metrics.clone(),
        )?;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let (tx, rx) = mpsc::channel(AHEAD);
        // sled reads and JSON parsing: blocking work, off the runtime's workers.
        tokio::task::spawn_blocking(move || {
            let mut read = 0;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reader.read(&store, &tx, &mut read)
            }));
            let failed = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                // Never a short answer: the scan's stream ends with the error.
                Err(panic) => Some(DataFusionError::Execution(format!(
                    "the scan failed: {}",
                    panic_message(&panic)
                ))),
            };
            if let Some(e) = failed {
                let _ = tx.blocking_send(Err(e));
            }
            metrics.add("shardline_leaf_scan_rows_total", read as f64);
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            ReceiverStream::new(rx),
        )))
    }
}

type Sender = mpsc::Sender<Result<RecordBatch>>;

/// One scan of a table's committed rows into record batches.
struct Reader {
    table: TableRef,
    columns: Vec<common::catalog::tables::TableColumn>,
    compiled: Vec<Option<common::expr::Expr>>,
    /// The table columns the scan returns, in order.
    positions: Vec<usize>,
    /// The JSON values it returns after them.
    derived: Vec<Derived>,
    /// The table columns read from stored rows: `positions`, then the sources of `derived`
    /// not among them; `read_schema` is theirs.
    read_positions: Vec<usize>,
    read_schema: SchemaRef,
    schema: SchemaRef,
    limit: usize,
    index: Option<(String, Range)>,
    /// Skips segments' row groups by their min/max (the filter above the scan).
    pruning: Option<Arc<PruningPredicate>>,
    /// The filter above the scan, for what segments' JSON sub-columns answer of it.
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// How segments are read, per file schema met ([`Reader::segment_plan`]).
    segment_plans: std::sync::Mutex<Vec<(SchemaRef, Arc<SegmentPlan>)>>,
    metrics: Metrics,
}

/// How a scan reads the segments of one file schema.
struct SegmentPlan {
    /// The part of the scan's filter the segment's JSON sub-columns answer (over the file's
    /// columns), applied while reading; and as a pruning predicate over row groups.
    sub_filter: Option<Arc<dyn PhysicalExpr>>,
    by_subs: Option<Arc<PruningPredicate>>,
    /// Per derived value, the sub-column holding it.
    subs: Vec<Option<String>>,
    /// The file columns read, and whether they are all the scan needs (otherwise: every
    /// column, the missing computed ones computed).
    columns: Vec<String>,
    complete: bool,
}

fn plan_error(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Plan(e.to_string())
}

fn store_error(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("partition store: {e}"))
}

impl Reader {
    fn new(
        scan: &proto::TableScan,
        derived: &[Derived],
        schema: SchemaRef,
        predicate: Option<Arc<dyn PhysicalExpr>>,
        metrics: Metrics,
    ) -> Result<Self> {
        let columns = query::columns::from_proto(&scan.columns).map_err(plan_error)?;
        let compiled = common::expr::compile_table(&columns).map_err(plan_error)?;
        let positions: Vec<usize> = match &scan.projection {
            Some(p) => p.columns.iter().map(|i| *i as usize).collect(),
            None => (0..columns.len()).collect(),
        };
        let mut read_positions = positions.clone();
        for d in derived {
            if !read_positions.contains(&d.column) {
                read_positions.push(d.column);
            }
        }
        let read_schema = Arc::new(common::arrow::table_schema(&columns).project(&read_positions)?);
        let index = scan
            .index_range
            .as_ref()
            .map(|r| -> Result<(String, Range)> {
                let parse = |v: &Option<String>, inclusive: bool| {
                    v.as_deref()
                        .map(|j| serde_json::from_str(j).map(|v| (v, inclusive)))
                        .transpose()
                        .map_err(|e| plan_error(format!("bad index bound: {e}")))
                };
                Ok((
                    r.index.clone(),
                    Range {
                        lower: parse(&r.lower_json, r.lower_inclusive)?,
                        upper: parse(&r.upper_json, r.upper_inclusive)?,
                    },
                ))
            })
            .transpose()?;
        Ok(Self {
            table: TableRef::new(scan.table_id, &scan.database, &scan.table),
            columns,
            compiled,
            positions,
            derived: derived.to_vec(),
            read_positions,
            read_schema,
            limit: scan.limit.map_or(usize::MAX, |l| l as usize),
            index,
            predicate: predicate.clone(),
            segment_plans: Default::default(),
            pruning: predicate.and_then(|p| {
                PruningPredicateBuilder::new()
                    .with_file_schema(schema.clone())
                    .build(p)
            }),
            schema,
            metrics,
        })
    }

    /// Sends the table's rows to `tx` in batches until the end, the limit, or a gone reader:
    /// its column segments, then the row segment above them.
    fn read(&self, store: &Store, tx: &Sender, read: &mut usize) -> Result<()> {
        let snapshot = store.table_snapshot(&self.table);
        let segments = Store::snapshot_segments(&snapshot);
        let indexed = match &self.index {
            Some((index, range)) => store
                .scan_index(&self.table, index, range, &snapshot)
                .map_err(store_error)?,
            None => None,
        };
        if self.positions.is_empty() && self.derived.is_empty() {
            // No column wanted (COUNT(*)): how many rows, without reading them.
            let tail = match &indexed {
                Some(rows) => rows.len(),
                None => store
                    .count_tail(&self.table, &snapshot)
                    .map_err(store_error)?,
            };
            let in_segments: u64 = segments.iter().map(|(_, s)| s.rows).sum();
            let mut left = (tail + in_segments as usize).min(self.limit);
            *read = left;
            while left > 0 {
                let k = left.min(BATCH_ROWS);
                let batch = common::arrow::empty_rows(&self.schema, k)?;
                if tx.blocking_send(Ok(batch)).is_err() {
                    return Ok(());
                }
                left -= k;
            }
            return Ok(());
        }
        for (path, _) in &segments {
            if !self.read_segment(path, tx, read)? {
                return Ok(());
            }
        }
        let mut batch = Batch::default();
        let mut each = |row: &[u8]| -> Result<bool> {
            if *read >= self.limit {
                return Ok(false);
            }
            batch.push(self.row(row)?, row.len());
            *read += 1;
            if batch.full() && !self.send(&mut batch, tx)? {
                return Ok(false);
            }
            Ok(*read < self.limit)
        };
        match &indexed {
            Some(rows) => {
                for r in rows {
                    if !each(r.as_bytes())? {
                        break;
                    }
                }
            }
            None => {
                let mut failed = None;
                store
                    .for_each_tail_row(&self.table, &snapshot, |row| {
                        each(row).or_else(|e| {
                            failed = Some(e);
                            Ok(false)
                        })
                    })
                    .map_err(store_error)?;
                if let Some(e) = failed {
                    return Err(e);
                }
            }
        }
        if !batch.rows.is_empty() {
            self.send(&mut batch, tx)?;
        }
        Ok(())
    }

    /// How this scan reads segments of `schema`: worked out once per file schema a scan
    /// meets (a table's segments mostly share one), not once per segment.
    fn segment_plan(&self, schema: &SchemaRef) -> Arc<SegmentPlan> {
        let mut plans = self.segment_plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, plan)) = plans.iter().find(|(s, _)| s == schema) {
            return plan.clone();
        }
        let file_subs = crate::store::segments::json::file_sub_columns(schema);
        let sub_filter = self.sub_column_filter(&file_subs);
        let by_subs = sub_filter.as_ref().and_then(|f| {
            PruningPredicateBuilder::new()
                .with_file_schema(schema.clone())
                .build(f.clone())
        });
        let has = |n: &str| schema.column_with_name(n).is_some();
        // Each derived value from its sub-column where the segment keeps one.
        let subs: Vec<Option<String>> = self
            .derived
            .iter()
            .map(|d| sub_column_of(&file_subs, d))
            .collect();
        let mut wanted: Vec<String> = self
            .positions
            .iter()
            .map(|i| self.columns[*i].name.clone())
            .collect();
        for (d, sub) in self.derived.iter().zip(&subs) {
            let n = sub.as_deref().unwrap_or(d.source.as_str());
            if !wanted.iter().any(|w| w == n) {
                wanted.push(n.to_string());
            }
        }
        let complete = wanted.iter().all(|n| has(n));
        // A segment written before a computed column was added: read the columns it has and
        // compute the rest, as for such rows in the row segment.
        let columns = if complete {
            wanted
        } else {
            self.columns.iter().map(|c| c.name.clone()).collect()
        };
        let plan = Arc::new(SegmentPlan {
            sub_filter,
            by_subs,
            subs,
            columns,
            complete,
        });
        plans.push((schema.clone(), plan.clone()));
        plan
    }

    /// Sends the rows of one segment the filter may keep; `false` once the reader is gone or
    /// the limit is reached.
    fn read_segment(&self, path: &std::path::Path, tx: &Sender, read: &mut usize) -> Result<bool> {
        let segment = Segment::open(path).map_err(store_error)?;
        let plan = self.segment_plan(segment.schema());
        let mut groups = segment.row_groups(self.pruning.as_deref());
        if let Some(p) = &plan.by_subs {
            let keep = segment.row_groups(Some(p));
            groups.retain(|g| keep.contains(g));
        }
        let skipped = segment_groups(&segment) - groups.len();
        if skipped > 0 {
            self.metrics
                .add("shardline_leaf_row_groups_skipped_total", skipped as f64);
        }
        if groups.is_empty() {
            self.metrics
                .add("shardline_leaf_segments_skipped_total", 1.0);
            return Ok(true);
        }
        let (subs, complete) = (&plan.subs, plan.complete);
        let columns: Vec<&str> = plan.columns.iter().map(String::as_str).collect();
        let reader = segment
            .read(
                &columns,
                groups,
                BATCH_BYTES,
                BATCH_ROWS,
                plan.sub_filter.clone(),
            )
            .map_err(store_error)?;
        for b in reader {
            let b = b.map_err(|e| store_error(format!("reading {}: {e}", path.display())))?;
            let b = if complete {
                self.finish(&b, subs)?
            } else {
                let rows: Vec<Vec<Json>> = common::arrow::batch_to_rows(&b)
                    .into_iter()
                    .map(|mut r| {
                        common::expr::complete_row(&mut r, &self.columns, &self.compiled);
                        self.read_positions
                            .iter()
                            .map(|i| r.get_mut(*i).map(Json::take).unwrap_or(Json::Null))
                            .collect()
                    })
                    .collect();
                self.finish(
                    &common::arrow::rows_to_batch(&self.read_schema, &rows)?,
                    &[],
                )?
            };
            let left = self.limit - *read;
            let b = if b.num_rows() > left {
                b.slice(0, left)
            } else {
                b
            };
            *read += b.num_rows();
            if tx.blocking_send(Ok(b)).is_err() || *read >= self.limit {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The part of the filter above the scan that this segment's JSON sub-columns answer
    /// alone (over the segment's columns): `JSON_EXTRACT_<type>(col, 'key') <op> ...`
    /// conjuncts whose paths it keeps with that type.
    fn sub_column_filter(
        &self,
        subs: &crate::store::segments::json::FileSubColumns,
    ) -> Option<Arc<dyn PhysicalExpr>> {
        use crate::store::segments::json::{self, SubType};
        use datafusion::physical_expr::expressions::Column;
        if subs.is_empty() {
            return None;
        }
        let predicate = self.underived(self.predicate.as_ref()?)?;
        let lookup = |source: &str, path: &[String], ty: SubType| {
            subs.get(&(source.to_string(), path.to_vec(), ty))
                .map(|(name, i)| Column::new(name, *i))
        };
        let parts: Vec<Arc<dyn PhysicalExpr>> =
            datafusion::physical_expr::split_conjunction(&predicate)
                .into_iter()
                .filter_map(|c| json::rewrite(c, &lookup))
                .collect();
        datafusion::physical_expr::conjunction_opt(parts)
    }

    /// `e` with the scan's derived columns replaced by the calls they hold (the form
    /// [`json::rewrite`](crate::store::segments::json::rewrite) maps onto sub-columns).
    fn underived(&self, e: &Arc<dyn PhysicalExpr>) -> Option<Arc<dyn PhysicalExpr>> {
        use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
        use datafusion::physical_expr::expressions::Column;
        if self.derived.is_empty() {
            return Some(e.clone());
        }
        Arc::clone(e)
            .transform_down(|n| {
                let d = n
                    .downcast_ref::<Column>()
                    .and_then(|c| self.derived.iter().find(|d| d.field.name() == c.name()));
                Ok(match d {
                    Some(d) => Transformed::yes(d.expr.clone()),
                    None => Transformed::no(n),
                })
            })
            .data()
            .ok()
    }

    /// The scan's output for a batch of stored columns (by name): the projected table
    /// columns, then each derived value, read from the sub-column `subs` names for it or
    /// computed from its JSON column.
    fn finish(&self, b: &RecordBatch, subs: &[Option<String>]) -> Result<RecordBatch> {
        let column = |n: &str| {
            b.column_by_name(n)
                .cloned()
                .ok_or_else(|| store_error(format!("segment lacks column {n:?}")))
        };
        let mut cols = Vec::with_capacity(self.schema.fields().len());
        for i in &self.positions {
            cols.push(column(&self.columns[*i].name)?);
        }
        let (mut read, mut computed) = (0, 0);
        for (k, d) in self.derived.iter().enumerate() {
            let a = match subs.get(k).and_then(|s| s.as_deref()) {
                Some(sub) => {
                    read += b.num_rows();
                    column(sub)?
                }
                None => {
                    computed += b.num_rows();
                    d.evaluate(&column(&d.source)?)?
                }
            };
            let want = d.field.data_type();
            cols.push(if a.data_type() == want {
                a
            } else {
                datafusion::arrow::compute::cast(&a, want)?
            });
        }
        if read > 0 {
            self.metrics.add(
                "shardline_leaf_json_values_from_sub_columns_total",
                read as f64,
            );
        }
        if computed > 0 {
            self.metrics
                .add("shardline_leaf_json_values_computed_total", computed as f64);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            cols,
            &options,
        )?)
    }

    /// One stored row, its computed columns filled in, projected.
    fn row(&self, stored: &[u8]) -> Result<Vec<Json>> {
        let mut values: Vec<Json> = serde_json::from_slice(stored)
            .map_err(|e| store_error(format!("bad stored row: {e}")))?;
        if values.len() < self.columns.len() {
            common::expr::complete_row(&mut values, &self.columns, &self.compiled);
        }
        Ok(self
            .read_positions
            .iter()
            .map(|i| values.get_mut(*i).map(Json::take).unwrap_or(Json::Null))
            .collect())
    }

    /// Sends the rows gathered so far as one batch; `false` if the reader is gone.
    fn send(&self, batch: &mut Batch, tx: &Sender) -> Result<bool> {
        let rows = std::mem::take(&mut batch.rows);
        batch.bytes = 0;
        let b = self.finish(
            &common::arrow::rows_to_batch(&self.read_schema, &rows)?,
            &[],
        )?;
        Ok(tx.blocking_send(Ok(b)).is_ok())
    }
}

#[derive(Default)]
struct Batch {
    rows: Vec<Vec<Json>>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, row: Vec<Json>, bytes: usize) {
        self.rows.push(row);
        self.bytes += bytes;
    }

    fn full(&self) -> bool {
        self.rows.len() >= BATCH_ROWS || self.bytes >= BATCH_BYTES
    }
}

/// The segment's sub-column holding `d`'s value for every row, if it keeps one: its field.
fn sub_column_of(
    subs: &crate::store::segments::json::FileSubColumns,
    d: &Derived,
) -> Option<String> {
    let ty = crate::store::segments::json::SubType::of_function(&d.function)?;
    subs.get(&(d.source.clone(), d.path.clone(), ty))
        .map(|(name, _)| name.clone())
}

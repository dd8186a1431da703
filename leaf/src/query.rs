//! The leaf's part of queries: the aggregator sends a plan fragment (DataFusion physical plan,
//! datafusion-proto bytes); the leaf runs it over its store and streams the result back, a
//! record batch per message, while the aggregator reads (a bounded channel: a slow reader
//! slows the scan, a gone one stops it).

use crate::store::{Range, Store, TableRef};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use query::scan::ScanSource;
use serde_json::Value as Json;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Most rows in one record batch a scan produces.
pub const BATCH_ROWS: usize = 8192;
/// A scan's record batch ends once its rows' stored JSON reaches this many bytes, so a batch
/// of 1 MiB records stays a few MiB (one gRPC message) rather than gigabytes.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Batches produced ahead of the reader, per scan and per result stream.
const AHEAD: usize = 2;

/// The stream of result messages of a query.
pub type Messages = ReceiverStream<Result<proto::QueryResponse, Status>>;

fn context() -> &'static SessionContext {
    static CONTEXT: std::sync::OnceLock<SessionContext> = std::sync::OnceLock::new();
    CONTEXT.get_or_init(|| query::session::context(query::session::config("information_schema")))
}

/// Starts running a fragment over `store`; its result batches arrive on the returned stream.
pub fn run(plan: &[u8], store: Store) -> Result<Messages, Status> {
    let task = context().task_ctx();
    let source: Arc<dyn ScanSource> = Arc::new(StoreSource { store });
    let plan = query::fragment::decode(plan, &task, source)
        .map_err(|e| Status::invalid_argument(format!("cannot read the query plan: {e}")))?;
    let runtime = query::session::runtime().map_err(Status::internal)?;
    let (tx, rx) = mpsc::channel(AHEAD);
    runtime.spawn(async move {
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
                    .map(|arrow_ipc| proto::QueryResponse { arrow_ipc })
                    .map_err(|e| Status::internal(format!("encoding a result batch: {e}")))
            });
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

fn query_status(e: DataFusionError) -> Status {
    Status::internal(e.find_root().to_string())
}

/// The leaf's store as the source of [`query::scan::LeafScanExec`].
#[derive(Debug)]
struct StoreSource {
    store: Store,
}

impl ScanSource for StoreSource {
    fn scan(
        &self,
        scan: &proto::TableScan,
        schema: SchemaRef,
    ) -> Result<SendableRecordBatchStream> {
        let reader = Reader::new(scan, schema.clone())?;
        let store = self.store.clone();
        let (tx, rx) = mpsc::channel(AHEAD);
        // sled reads and JSON parsing: blocking work, off the runtime's workers.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reader.read(&store, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            ReceiverStream::new(rx),
        )))
    }
}

type Sender = mpsc::Sender<Result<datafusion::arrow::array::RecordBatch>>;

/// One scan of a table's committed rows into record batches.
struct Reader {
    table: TableRef,
    columns: Vec<common::catalog::tables::TableColumn>,
    compiled: Vec<Option<common::expr::Expr>>,
    positions: Vec<usize>,
    schema: SchemaRef,
    limit: usize,
    index: Option<(String, Range)>,
}

fn plan_error(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Plan(e.to_string())
}

fn store_error(e: impl std::fmt::Display) -> DataFusionError {
    DataFusionError::Execution(format!("partition store: {e}"))
}

impl Reader {
    fn new(scan: &proto::TableScan, schema: SchemaRef) -> Result<Self> {
        let columns = query::columns::from_proto(&scan.columns).map_err(plan_error)?;
        let compiled = common::expr::compile_table(&columns).map_err(plan_error)?;
        let positions = match &scan.projection {
            Some(p) => p.columns.iter().map(|i| *i as usize).collect(),
            None => (0..columns.len()).collect(),
        };
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
            schema,
            limit: scan.limit.map_or(usize::MAX, |l| l as usize),
            index,
        })
    }

    /// Sends the table's rows to `tx` in batches until the end, the limit, or a gone reader.
    fn read(&self, store: &Store, tx: &Sender) -> Result<()> {
        let indexed = match &self.index {
            Some((index, range)) => store
                .scan_index(&self.table, index, range)
                .map_err(store_error)?,
            None => None,
        };
        if self.positions.is_empty() {
            // No column wanted (COUNT(*)): how many rows, without reading them.
            let n = match &indexed {
                Some(rows) => rows.len(),
                None => store.count(&self.table).map_err(store_error)?,
            };
            let mut left = n.min(self.limit);
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
        let mut batch = Batch::default();
        let mut taken = 0usize;
        let mut each = |row: &[u8]| -> Result<bool> {
            batch.push(self.row(row)?, row.len());
            taken += 1;
            if batch.full() && !self.send(&mut batch, tx)? {
                return Ok(false);
            }
            Ok(taken < self.limit)
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
                    .for_each_row(&self.table, |row| {
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

    /// One stored row, its computed columns filled in, projected.
    fn row(&self, stored: &[u8]) -> Result<Vec<Json>> {
        let mut values: Vec<Json> = serde_json::from_slice(stored)
            .map_err(|e| store_error(format!("bad stored row: {e}")))?;
        if values.len() < self.columns.len() {
            common::expr::complete_row(&mut values, &self.columns, &self.compiled);
        }
        Ok(self
            .positions
            .iter()
            .map(|i| values.get_mut(*i).map(Json::take).unwrap_or(Json::Null))
            .collect())
    }

    /// Sends the rows gathered so far as one batch; `false` if the reader is gone.
    fn send(&self, batch: &mut Batch, tx: &Sender) -> Result<bool> {
        let rows = std::mem::take(&mut batch.rows);
        batch.bytes = 0;
        let b = common::arrow::rows_to_batch(&self.schema, &rows)?;
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

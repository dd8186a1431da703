//! What a statement returns: a result set or an OK, or a MySQL error.

use datafusion::arrow::array::{
    Array, AsArray, BinaryArray, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::arrow::util::display::ArrayFormatter;
use std::fmt;

/// A MySQL error: the numeric code clients switch on and a message that says what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub code: u16,
    pub message: String,
}

/// MySQL error codes used by Shardline.
pub mod codes {
    pub const DB_CREATE_EXISTS: u16 = 1007;
    pub const DB_DROP_EXISTS: u16 = 1008;
    pub const ACCESS_DENIED: u16 = 1045;
    pub const NO_DB: u16 = 1046;
    pub const BAD_DB: u16 = 1049;
    pub const PARSE: u16 = 1064;
    pub const EMPTY_QUERY: u16 = 1065;
    pub const UNKNOWN: u16 = 1105;
    pub const UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;
    pub const LOCK_WAIT_TIMEOUT: u16 = 1205;
    pub const WRONG_ARGUMENTS: u16 = 1210;
    pub const GLOBAL_VARIABLE: u16 = 1229;
    pub const WRONG_VALUE_FOR_VAR: u16 = 1231;
    pub const NOT_SUPPORTED_YET: u16 = 1235;
    pub const READ_ONLY_VARIABLE: u16 = 1238;
}

impl SqlError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn parse(message: impl fmt::Display) -> Self {
        Self::new(
            codes::PARSE,
            format!("You have an error in your SQL syntax: {message}"),
        )
    }

    pub fn unsupported(what: impl fmt::Display) -> Self {
        Self::new(
            codes::NOT_SUPPORTED_YET,
            format!("This version of Shardline doesn't yet support '{what}'"),
        )
    }
}

impl fmt::Display for SqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ERROR {}: {}", self.code, self.message)
    }
}

impl std::error::Error for SqlError {}

impl From<crate::error::Error> for SqlError {
    fn from(e: crate::error::Error) -> Self {
        use crate::error::Error as E;
        use common::Error as C;
        let code = match &e {
            E::Catalog(c) => match c {
                C::DatabaseExists { .. } => codes::DB_CREATE_EXISTS,
                C::DatabaseNotFound { .. } => codes::DB_DROP_EXISTS,
                C::UnknownVariable { .. } => codes::UNKNOWN_SYSTEM_VARIABLE,
                C::InvalidVariableValue { .. } => codes::WRONG_VALUE_FOR_VAR,
                C::ReadOnlyVariable { .. } => codes::READ_ONLY_VARIABLE,
                C::InvalidPartitionCount { .. } => codes::WRONG_ARGUMENTS,
                C::UnknownDatabase { .. } => codes::BAD_DB,
                C::TableNotFound { .. } => 1146,
                C::TableExists { .. } => 1050,
                C::FeatureDisabled => 1149,
                _ => codes::UNKNOWN,
            },
            E::CommitTimeout(_) => codes::LOCK_WAIT_TIMEOUT,
            _ => codes::UNKNOWN,
        };
        SqlError::new(code, e.to_string())
    }
}

impl From<common::Error> for SqlError {
    fn from(e: common::Error) -> Self {
        crate::error::Error::Catalog(e).into()
    }
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Double(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl Value {
    /// The value as text, as `SET` stores it and the text protocol shows it.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::Double(d) => Some(d.to_string()),
            Value::Text(s) => Some(s.clone()),
            Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        }
    }
}

/// The MySQL type a result column is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    BigInt,
    Double,
    Text,
    Json,
    Blob,
    Null,
}

/// A result column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
}

impl Column {
    pub fn text(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: ColumnKind::Text,
        }
    }

    pub fn bigint(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: ColumnKind::BigInt,
        }
    }
}

/// The outcome of a statement.
#[derive(Debug)]
pub enum QueryOutput {
    /// A result set.
    Rows {
        columns: Vec<Column>,
        rows: Vec<Vec<Value>>,
    },
    /// A result set whose rows arrive as the query produces them.
    Stream(RowStream),
    /// An OK packet.
    Ok { affected_rows: u64 },
}

/// The rows of a running query, a chunk (one record batch) at a time; dropping it stops the
/// query.
pub struct RowStream {
    pub columns: Vec<Column>,
    first: Option<Result<RecordBatch, SqlError>>,
    rows: tokio::sync::mpsc::Receiver<Result<RecordBatch, SqlError>>,
    _job: tokio_util::task::AbortOnDropHandle<()>,
}

impl fmt::Debug for RowStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RowStream")
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

impl RowStream {
    pub fn new(
        columns: Vec<Column>,
        rows: tokio::sync::mpsc::Receiver<Result<RecordBatch, SqlError>>,
        job: tokio_util::task::AbortOnDropHandle<()>,
    ) -> Self {
        Self {
            columns,
            first: None,
            rows,
            _job: job,
        }
    }

    /// Waits for the first chunk: an error the query meets before any row fails the
    /// statement itself.
    pub async fn prefetch(&mut self) -> Result<(), SqlError> {
        match self.rows.recv().await {
            Some(Err(e)) => Err(e),
            first => {
                self.first = first;
                Ok(())
            }
        }
    }

    /// The next chunk of rows (read them with [`Cells`]); `None` at the end.
    pub async fn next(&mut self) -> Option<Result<RecordBatch, SqlError>> {
        match self.first.take() {
            Some(first) => Some(first),
            None => self.rows.recv().await,
        }
    }
}

impl QueryOutput {
    pub fn ok() -> Self {
        QueryOutput::Ok { affected_rows: 0 }
    }

    /// A result set of text columns.
    pub fn text_rows(names: &[&str], rows: Vec<Vec<Value>>) -> Self {
        QueryOutput::Rows {
            columns: names.iter().map(|n| Column::text(*n)).collect(),
            rows,
        }
    }
}

/// One value of a streamed result, borrowed from its record batch: the MySQL writer sends
/// it as it is, with no copy into a [`Value`] on the way.
pub enum Cell<'a> {
    Null,
    Int(i64),
    Double(f64),
    Text(&'a str),
    Bytes(&'a [u8]),
    /// Other types, in Arrow's display form.
    Formatted(String),
}

impl<'a> From<&'a Value> for Cell<'a> {
    fn from(v: &'a Value) -> Self {
        match v {
            Value::Null => Cell::Null,
            Value::Int(i) => Cell::Int(*i),
            Value::Double(d) => Cell::Double(*d),
            Value::Text(s) => Cell::Text(s),
            Value::Bytes(b) => Cell::Bytes(b),
        }
    }
}

enum ColumnCells<'a> {
    Int(&'a Int64Array),
    Double(&'a Float64Array),
    Bool(&'a BooleanArray),
    Bytes(&'a BinaryArray),
    Text(&'a StringArray),
    /// Formatted cell by cell (rare types: the formatter is not `Send`, and cells are written
    /// across awaits).
    Other(&'a dyn Array),
}

/// The cells of a record batch of results, by row and column.
pub struct Cells<'a> {
    columns: Vec<ColumnCells<'a>>,
    rows: usize,
}

impl<'a> Cells<'a> {
    pub fn new(b: &'a RecordBatch) -> Result<Self, SqlError> {
        let columns = b
            .columns()
            .iter()
            .map(|c| {
                Ok(match c.data_type() {
                    DataType::Int64 => ColumnCells::Int(c.as_primitive::<Int64Type>()),
                    DataType::Float64 => ColumnCells::Double(c.as_primitive::<Float64Type>()),
                    DataType::Boolean => ColumnCells::Bool(c.as_boolean()),
                    DataType::Binary => ColumnCells::Bytes(c.as_binary::<i32>()),
                    DataType::Utf8 => ColumnCells::Text(c.as_string::<i32>()),
                    _ => {
                        // Fails now for a type Arrow cannot display, not mid-row.
                        ArrayFormatter::try_new(c.as_ref(), &Default::default())
                            .map_err(|e| SqlError::new(codes::UNKNOWN, e.to_string()))?;
                        ColumnCells::Other(c.as_ref())
                    }
                })
            })
            .collect::<Result<_, SqlError>>()?;
        Ok(Self {
            columns,
            rows: b.num_rows(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn width(&self) -> usize {
        self.columns.len()
    }

    pub fn cell(&self, row: usize, column: usize) -> Cell<'_> {
        let null = |a: &dyn Array| a.is_null(row);
        match &self.columns[column] {
            ColumnCells::Int(a) if !null(*a) => Cell::Int(a.value(row)),
            ColumnCells::Double(a) if !null(*a) => Cell::Double(a.value(row)),
            ColumnCells::Bool(a) if !null(*a) => Cell::Int(i64::from(a.value(row))),
            ColumnCells::Bytes(a) if !null(*a) => Cell::Bytes(a.value(row)),
            ColumnCells::Text(a) if !null(*a) => Cell::Text(a.value(row)),
            ColumnCells::Other(a) if !null(*a) => Cell::Formatted(
                ArrayFormatter::try_new(*a, &Default::default())
                    .map(|f| f.value(row).to_string())
                    .unwrap_or_default(),
            ),
            _ => Cell::Null,
        }
    }
}

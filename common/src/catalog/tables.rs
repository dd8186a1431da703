//! Tables in the catalog: columns (with persisted computed columns), the static schema of
//! Kafka Connect pipelines, and the DDL SingleStore prints for it.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A column's SQL type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColumnType {
    Text,
    Json,
    BigInt,
    Int,
    Double,
    Varchar(u32),
    Blob,
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Text => write!(f, "text"),
            ColumnType::Json => write!(f, "JSON"),
            ColumnType::BigInt => write!(f, "bigint(20)"),
            ColumnType::Int => write!(f, "int(11)"),
            ColumnType::Double => write!(f, "double"),
            ColumnType::Varchar(n) => write!(f, "varchar({n})"),
            ColumnType::Blob => write!(f, "blob"),
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableColumn {
    pub name: String,
    pub ty: ColumnType,
    pub nullable: bool,
    /// SQL of a persisted computed column (`AS <expr> PERSISTED <type>`).
    pub computed: Option<String>,
}

/// A secondary index on one column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    pub column: String,
}

/// A table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Unique in the cluster and never reused: the leaves store a table's rows under it, so a
    /// table created again under a dropped one's name starts empty. Assigned by the catalog
    /// when the table is created; 0 for tables created before ids existed (their rows are
    /// stored under the table's name).
    #[serde(default)]
    pub id: u64,
    pub database: String,
    pub name: String,
    pub columns: Vec<TableColumn>,
    pub created_ms: u64,
    #[serde(default)]
    pub indexes: Vec<Index>,
}

/// The three columns every Kafka Connect pipeline loads.
pub const STATIC_COLUMNS: [&str; 3] = ["topic", "id", "record"];

impl Table {
    /// The static schema an INFERRED Kafka Connect pipeline creates.
    pub fn kafka_connect_static(database: &str, name: &str, created_ms: u64) -> Self {
        let col = |name: &str, ty| TableColumn {
            name: name.into(),
            ty,
            nullable: false,
            computed: None,
        };
        Table {
            id: 0,
            database: database.into(),
            name: name.into(),
            columns: vec![
                col("topic", ColumnType::Text),
                col("id", ColumnType::Json),
                col("record", ColumnType::Json),
            ],
            created_ms,
            indexes: vec![],
        }
    }

    /// Whether the table can receive a Kafka Connect pipeline's rows: it has the static
    /// columns `topic`, `id`, `record` (other columns must be computed).
    pub fn check_static_schema(&self) -> Result<(), String> {
        for name in STATIC_COLUMNS {
            if !self
                .columns
                .iter()
                .any(|c| c.name == name && c.computed.is_none())
            {
                return Err(format!(
                    "table '{}' has no column '{name}'; a Kafka Connect pipeline loads the columns topic, id and record",
                    self.name
                ));
            }
        }
        if let Some(c) = self.columns.iter().find(|c| {
            c.computed.is_none() && !STATIC_COLUMNS.contains(&c.name.as_str()) && !c.nullable
        }) {
            return Err(format!(
                "table '{}' has a NOT NULL column '{}' a Kafka Connect pipeline cannot fill",
                self.name, c.name
            ));
        }
        Ok(())
    }

    pub fn column(&self, name: &str) -> Option<&TableColumn> {
        self.columns
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// `SHOW CREATE TABLE` text, in SingleStore's layout.
    pub fn create_sql(&self) -> String {
        let mut out = format!("CREATE TABLE `{}` (\n", self.name);
        for c in &self.columns {
            let ty = match (&c.ty, &c.computed) {
                (ColumnType::Text, None) => {
                    "TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin".to_string()
                }
                (ColumnType::Json, None) => "JSON COLLATE utf8mb4_bin".to_string(),
                (ty, None) => ty.to_string(),
                (ty, Some(expr)) => format!("AS {expr} PERSISTED {ty}"),
            };
            let null = if c.computed.is_some() {
                ""
            } else if c.nullable {
                " DEFAULT NULL"
            } else {
                " NOT NULL"
            };
            out.push_str(&format!("`{}` {ty}{null},\n", c.name));
        }
        for i in &self.indexes {
            out.push_str(&format!("KEY `{}` (`{}`),\n", i.name, i.column));
        }
        out.push_str("SORT KEY `__UNORDERED` (),\nSHARD KEY ()\n)\n");
        out.push_str(
            "AUTOSTATS_CARDINALITY_MODE = INCREMENTAL\nAUTOSTATS_HISTOGRAM_MODE = CREATE\nAUTOSTATS_SAMPLING = ON\nSQL_MODE = 'STRICT_ALL_TABLES,NO_AUTO_CREATE_USER'\nCHARACTER SET = utf8mb4\nCOLLATE = utf8mb4_bin",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_schema() {
        let t = Table::kafka_connect_static("d", "kinesis_pipeline", 0);
        t.check_static_schema().unwrap();
        let sql = t.create_sql();
        // The spec's DDL, verbatim (without the statement's terminating semicolon).
        let spec = "CREATE TABLE `kinesis_pipeline` (
`topic` TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
`id` JSON COLLATE utf8mb4_bin NOT NULL,
`record` JSON COLLATE utf8mb4_bin NOT NULL,
SORT KEY `__UNORDERED` (),
SHARD KEY ()
)
AUTOSTATS_CARDINALITY_MODE = INCREMENTAL
AUTOSTATS_HISTOGRAM_MODE = CREATE
AUTOSTATS_SAMPLING = ON
SQL_MODE = 'STRICT_ALL_TABLES,NO_AUTO_CREATE_USER'
CHARACTER SET = utf8mb4
COLLATE = utf8mb4_bin";
        assert_eq!(sql, spec);
        let mut bad = t.clone();
        bad.columns.remove(1);
        assert!(bad.check_static_schema().unwrap_err().contains("'id'"));
    }
}

//! A table's columns as the catalog keeps them and as they cross the wire.

use common::catalog::tables::{ColumnType, TableColumn};
use proto::ColumnType as Wire;

/// The wire form of a table's columns.
pub fn to_proto(columns: &[TableColumn]) -> Vec<proto::Column> {
    columns
        .iter()
        .map(|c| {
            let (ty, length) = match c.ty {
                ColumnType::Text => (Wire::Text, 0),
                ColumnType::Json => (Wire::Json, 0),
                ColumnType::BigInt => (Wire::Bigint, 0),
                ColumnType::Int => (Wire::Int, 0),
                ColumnType::Double => (Wire::Double, 0),
                ColumnType::Varchar(n) => (Wire::Varchar, n),
                ColumnType::Blob => (Wire::Blob, 0),
            };
            proto::Column {
                name: c.name.clone(),
                r#type: ty as i32,
                length,
                nullable: c.nullable,
                computed: c.computed.clone(),
            }
        })
        .collect()
}

/// The catalog form of columns from the wire; an unknown type is an error (a newer peer).
pub fn from_proto(columns: &[proto::Column]) -> Result<Vec<TableColumn>, String> {
    columns
        .iter()
        .map(|c| {
            let ty = match Wire::try_from(c.r#type) {
                Ok(Wire::Text) => ColumnType::Text,
                Ok(Wire::Json) => ColumnType::Json,
                Ok(Wire::Bigint) => ColumnType::BigInt,
                Ok(Wire::Int) => ColumnType::Int,
                Ok(Wire::Double) => ColumnType::Double,
                Ok(Wire::Varchar) => ColumnType::Varchar(c.length),
                Ok(Wire::Blob) => ColumnType::Blob,
                Err(_) => return Err(format!("column {}: unknown type {}", c.name, c.r#type)),
            };
            Ok(TableColumn {
                name: c.name.clone(),
                ty,
                nullable: c.nullable,
                computed: c.computed.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        let columns: Vec<TableColumn> = [
            ColumnType::Text,
            ColumnType::Json,
            ColumnType::BigInt,
            ColumnType::Int,
            ColumnType::Double,
            ColumnType::Varchar(255),
            ColumnType::Blob,
        ]
        .into_iter()
        .enumerate()
        .map(|(i, ty)| TableColumn {
            name: format!("c{i}"),
            ty,
            nullable: i % 2 == 0,
            computed: (i == 2).then(|| "JSON_EXTRACT_BIGINT(c1, 'a')".to_string()),
        })
        .collect();
        assert_eq!(from_proto(&to_proto(&columns)), Ok(columns));
    }
}

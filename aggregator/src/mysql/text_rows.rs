//! Result rows in MySQL's text protocol, each encoded whole into one reused buffer and handed
//! to opensrv-mysql as a single write.
//!
//! Written column by column, opensrv's row packet starts from an empty buffer for every row
//! and grows it once per column (a few reallocations per row), and formats every integer
//! through a `String`: a full scan spent a fifth of the aggregator's CPU in the allocator.
//! Here the cells are encoded by opensrv's own [`ToMysqlValue`] text encoding (integers
//! through `itoa`), into a buffer that lives as long as the result set.

use crate::sql::result::{Cell, Cells};
use crate::sql::Value;
use opensrv_mysql::{Column, RowWriter, ToMysqlValue};
use std::io::{self, Write};
use tokio::io::AsyncWrite;

/// One row's cells, encoded already: written as the row's first column, and every other
/// column as [`Written`] (opensrv counts a row's columns by its writes).
struct Encoded<'a>(&'a [u8]);

impl ToMysqlValue for Encoded<'_> {
    fn to_mysql_text<W: Write>(&self, w: &mut W) -> io::Result<()> {
        w.write_all(self.0)
    }

    fn to_mysql_bin<W: Write>(&self, _: &mut W, _: &Column) -> io::Result<()> {
        Err(not_binary())
    }
}

/// [`Encoded`] and [`Written`] belong to text-protocol result sets only.
fn not_binary() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "a text-protocol row in a binary result set",
    )
}

/// A column whose bytes went out with the row's [`Encoded`] first column.
struct Written;

impl ToMysqlValue for Written {
    fn to_mysql_text<W: Write>(&self, _: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn to_mysql_bin<W: Write>(&self, _: &mut W, _: &Column) -> io::Result<()> {
        Err(not_binary())
    }
}

/// Writes the rows of a result set in the text protocol, one packet per row.
pub struct TextRows {
    row: Vec<u8>,
    width: usize,
}

impl TextRows {
    pub fn new(width: usize) -> Self {
        Self {
            row: Vec::with_capacity(1024),
            width,
        }
    }

    /// Writes row `row` of `cells`.
    pub async fn write_cells<W: AsyncWrite + Send + Unpin>(
        &mut self,
        w: &mut RowWriter<'_, W>,
        cells: &Cells<'_>,
        row: usize,
    ) -> io::Result<()> {
        self.row.clear();
        for col in 0..cells.width() {
            encode(&mut self.row, cells.cell(row, col))?;
        }
        self.send(w).await
    }

    /// Writes one row of values.
    pub async fn write_values<W: AsyncWrite + Send + Unpin>(
        &mut self,
        w: &mut RowWriter<'_, W>,
        row: Vec<Value>,
    ) -> io::Result<()> {
        self.row.clear();
        for v in &row {
            encode(&mut self.row, Cell::from(v))?;
        }
        self.send(w).await
    }

    async fn send<W: AsyncWrite + Send + Unpin>(
        &mut self,
        w: &mut RowWriter<'_, W>,
    ) -> io::Result<()> {
        if self.width > 0 {
            w.write_col(Encoded(&self.row))?;
            for _ in 1..self.width {
                w.write_col(Written)?;
            }
        }
        w.end_row().await
    }
}

/// Appends one cell in the text protocol: NULL as 0xFB, anything else as a length-encoded
/// string of its text.
fn encode(out: &mut Vec<u8>, cell: Cell<'_>) -> io::Result<()> {
    match cell {
        Cell::Null => None::<i64>.to_mysql_text(out),
        Cell::Int(i) => itoa::Buffer::new().format(i).as_bytes().to_mysql_text(out),
        Cell::Double(d) => d.to_mysql_text(out),
        Cell::Text(s) => s.to_mysql_text(out),
        Cell::Bytes(b) => b.to_mysql_text(out),
        Cell::Formatted(s) => s.to_mysql_text(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(cell: Cell<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, cell).unwrap();
        out
    }

    #[test]
    fn cells_encode_as_length_prefixed_text_or_null() {
        assert_eq!(encoded(Cell::Null), [0xFB]);
        assert_eq!(encoded(Cell::Int(-42)), b"\x03-42");
        assert_eq!(encoded(Cell::Int(i64::MIN)), b"\x14-9223372036854775808");
        assert_eq!(encoded(Cell::Double(1.5)), b"\x031.5");
        assert_eq!(encoded(Cell::Text("")), [0]);
        // 300 bytes: a two-byte length after 0xFC.
        let long = "x".repeat(300);
        let out = encoded(Cell::Text(&long));
        assert_eq!(&out[..3], [0xFC, 0x2C, 0x01]);
        assert_eq!(out.len(), 303);
        assert_eq!(encoded(Cell::Bytes(&[0, 0xFF])), [2, 0, 0xFF]);
    }
}

//! The key a row is marked by: its primary key `(id, created_at)` as text,
//! and its table when it is not the relay's own outbox table.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::quote_ident;

/// A row's primary key, as text, and its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowKey {
    /// The row's table as a quoted, schema-qualified name when it is not
    /// the relay's own outbox table (another outbox table of the
    /// publication); `None` for the relay's own.
    pub table: Option<Arc<str>>,
    /// `id` as text.
    pub id: Bytes,
    /// `created_at` as text.
    pub created_at: Bytes,
}

impl RowKey {
    /// The key of a row of `table` with this `id` and `created_at` (as
    /// text), in an allocation of its own: the values arrive as slices of a
    /// replication read buffer (or of a query's result), and a key that
    /// waits in the in-flight window for its mark must not keep the whole
    /// buffer alive — with slices, the relay's memory grew with the window
    /// by the WAL it spans rather than by the keys (BENCHMARKS.md,
    /// session 20).
    pub fn new(table: Option<Arc<str>>, id: &[u8], created_at: &[u8]) -> RowKey {
        let mut both = Vec::with_capacity(id.len() + created_at.len());
        both.extend_from_slice(id);
        both.extend_from_slice(created_at);
        let both = Bytes::from(both);
        RowKey {
            table,
            id: both.slice(..id.len()),
            created_at: both.slice(id.len()..),
        }
    }
}

/// The [`RowKey::table`] of the rows of `schema.table` for a relay whose
/// own outbox table is `home` (schema, table).
pub fn key_table(schema: &str, table: &str, home: (&str, &str)) -> Option<Arc<str>> {
    (schema != home.0 || table != home.1)
        .then(|| Arc::from(format!("{}.{}", quote_ident(schema), quote_ident(table))))
}

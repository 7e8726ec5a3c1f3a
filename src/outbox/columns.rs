//! Finding the outbox columns ([`OUTBOX_COLUMNS`]) in a replicated
//! relation by name, and reading an [`OutboxEvent`] out of a row's tuple
//! without copying.

use bytes::Bytes;

use super::event::{OutboxEvent, OUTBOX_COLUMNS};
use crate::pgoutput::{Relation, Tuple, TupleValue};

/// Position of `metadata`, the one optional column, in [`OUTBOX_COLUMNS`].
const METADATA: usize = 7;

/// Positions of the outbox columns in a relation, found by name from its
/// Relation message (so column order and extra columns do not matter).
#[derive(Clone, Debug)]
pub struct OutboxColumns {
    table: Bytes,
    /// Where each of [`OUTBOX_COLUMNS`] is in the relation.
    at: [Option<usize>; OUTBOX_COLUMNS.len()],
    status: Option<usize>,
}

/// Why a row could not be read as an outbox event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ColumnError {
    /// The relation lacks a required column.
    #[error("relation {relation} has no column {column:?}, so it is not an outbox table")]
    Missing {
        /// `schema.table`.
        relation: String,
        /// The missing column.
        column: &'static str,
    },
    /// The tuple has fewer values than the relation has columns.
    #[error("row has {got} values but the relation has column #{wanted}")]
    Short {
        /// Values in the tuple.
        got: usize,
        /// The index asked for.
        wanted: usize,
    },
    /// A required column is NULL, unchanged-TOAST or binary.
    #[error("column {column:?} is {kind}, expected a text value")]
    NotText {
        /// The column.
        column: &'static str,
        /// What it was instead.
        kind: &'static str,
    },
}

impl OutboxColumns {
    /// Locates the outbox columns in `relation`.
    pub fn from_relation(relation: &Relation) -> Result<OutboxColumns, ColumnError> {
        let find = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let mut at = [None; OUTBOX_COLUMNS.len()];
        for (i, name) in OUTBOX_COLUMNS.iter().enumerate() {
            at[i] = find(name);
            if at[i].is_none() && i != METADATA {
                return Err(ColumnError::Missing {
                    relation: format!("{}.{}", relation.namespace, relation.name),
                    column: name,
                });
            }
        }
        Ok(OutboxColumns {
            table: Bytes::copy_from_slice(relation.name.as_bytes()),
            at,
            status: find("status"),
        })
    }

    /// The text of required column `i` of [`OUTBOX_COLUMNS`].
    fn required(&self, tuple: &Tuple, i: usize) -> Result<Bytes, ColumnError> {
        // Every required position was found in `from_relation`.
        text(tuple, self.at[i].unwrap_or(usize::MAX), OUTBOX_COLUMNS[i])
    }

    /// The row's key `(id, created_at)` as text, when both are present: used
    /// to dead-letter a row even when the rest of it is unreadable.
    pub fn row_key(&self, tuple: &Tuple) -> Option<super::RowKey> {
        let id = self.required(tuple, 0).ok()?;
        let created_at = self.required(tuple, 1).ok()?;
        Some(super::RowKey { id, created_at })
    }

    /// True when the row was inserted as `PENDING` (or has no status column).
    /// Rows inserted in another status were not meant to be published.
    pub fn is_pending(&self, tuple: &Tuple) -> bool {
        match self.status {
            None => true,
            Some(i) => match tuple.0.get(i) {
                Some(TupleValue::Text(s)) => &s[..] == super::row_status::PENDING.as_bytes(),
                _ => true,
            },
        }
    }

    /// Reads the event from an inserted row.
    pub fn event(&self, tuple: &Tuple) -> Result<OutboxEvent, ColumnError> {
        Ok(OutboxEvent {
            table: self.table.clone(),
            id: self.required(tuple, 0)?,
            created_at: self.required(tuple, 1)?,
            tracking_id: self.required(tuple, 2)?,
            aggregate_id: self.required(tuple, 3)?,
            aggregate_type: self.required(tuple, 4)?,
            event_type: self.required(tuple, 5)?,
            payload: self.required(tuple, 6)?,
            metadata: match self.at[METADATA].and_then(|i| tuple.0.get(i)) {
                Some(TupleValue::Text(b)) => Some(b.clone()),
                _ => None,
            },
        })
    }
}

fn text(tuple: &Tuple, index: usize, column: &'static str) -> Result<Bytes, ColumnError> {
    match tuple.0.get(index) {
        Some(TupleValue::Text(b)) => Ok(b.clone()),
        Some(TupleValue::Null) => Err(ColumnError::NotText {
            column,
            kind: "NULL",
        }),
        Some(TupleValue::UnchangedToast) => Err(ColumnError::NotText {
            column,
            kind: "an unchanged TOAST value",
        }),
        Some(TupleValue::Binary(_)) => Err(ColumnError::NotText {
            column,
            kind: "binary",
        }),
        None => Err(ColumnError::Short {
            got: tuple.0.len(),
            wanted: index,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::RelationColumn;

    fn relation(names: &[&str]) -> Relation {
        Relation {
            xid: None,
            id: 1,
            namespace: "public".into(),
            name: "outbox".into(),
            replica_identity: b'd',
            columns: names
                .iter()
                .map(|n| RelationColumn {
                    flags: 0,
                    name: (*n).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    const COLS: &[&str] = &[
        "id",
        "tracking_id",
        "aggregate_id",
        "aggregate_type",
        "event_type",
        "payload",
        "metadata",
        "status",
        "created_at",
    ];

    fn tuple(values: &[Option<&'static str>]) -> Tuple {
        Tuple(
            values
                .iter()
                .map(|v| match v {
                    Some(s) => TupleValue::Text(Bytes::from_static(s.as_bytes())),
                    None => TupleValue::Null,
                })
                .collect(),
        )
    }

    #[test]
    fn columns_are_found_by_name_in_any_order() {
        let mut names = COLS.to_vec();
        names.reverse();
        names.insert(3, "extra");
        let cols = OutboxColumns::from_relation(&relation(&names)).unwrap();
        let mut values: Vec<Option<&'static str>> = vec![
            Some("2026-01-01 00:00:00+00"),
            Some("PENDING"),
            Some("{}"),
            Some("x"),
            Some("{\"a\":1}"),
            Some("Created"),
            Some("Order"),
            Some("agg"),
            Some("trk"),
            Some("7"),
        ];
        values.truncate(10);
        let e = cols.event(&tuple(&values)).unwrap();
        assert_eq!(&e.id[..], b"7");
        assert_eq!(&e.payload[..], b"{\"a\":1}");
        assert_eq!(&e.aggregate_type[..], b"Order");
        assert_eq!(&e.table[..], b"outbox");
        assert!(cols.is_pending(&tuple(&values)));
    }

    #[test]
    fn a_table_without_outbox_columns_is_not_an_outbox() {
        let err = OutboxColumns::from_relation(&relation(&["id", "name"])).unwrap_err();
        assert!(
            matches!(
                err,
                ColumnError::Missing {
                    column: "created_at",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn null_required_value_is_an_error_not_a_panic() {
        let cols = OutboxColumns::from_relation(&relation(COLS)).unwrap();
        let t = tuple(&[
            Some("1"),
            Some("t"),
            Some("a"),
            None,
            Some("e"),
            Some("{}"),
            None,
            Some("PENDING"),
            Some("c"),
        ]);
        assert!(matches!(
            cols.event(&t),
            Err(ColumnError::NotText {
                column: "aggregate_type",
                ..
            })
        ));
        assert!(cols.row_key(&t).is_some());
        let short = tuple(&[Some("1")]);
        assert!(matches!(cols.event(&short), Err(ColumnError::Short { .. })));
    }

    #[test]
    fn rows_inserted_in_another_status_are_not_pending() {
        let cols = OutboxColumns::from_relation(&relation(COLS)).unwrap();
        let t = tuple(&[
            Some("1"),
            Some("t"),
            Some("a"),
            Some("A"),
            Some("e"),
            Some("{}"),
            None,
            Some("COMPLETED"),
            Some("c"),
        ]);
        assert!(!cols.is_pending(&t));
    }
}

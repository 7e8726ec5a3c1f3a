//! Finding the outbox columns in a replicated relation by name, and reading
//! an [`OutboxEvent`] out of a row's tuple without copying.

use bytes::Bytes;

use crate::pgoutput::{Relation, Tuple, TupleValue};
use crate::route::OutboxEvent;

/// Positions of the outbox columns in a relation, found by name from its
/// Relation message (so column order and extra columns do not matter).
#[derive(Clone, Debug)]
pub struct OutboxColumns {
    table: Bytes,
    id: usize,
    created_at: usize,
    tracking_id: usize,
    aggregate_id: usize,
    aggregate_type: usize,
    event_type: usize,
    payload: usize,
    metadata: Option<usize>,
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
        let need = |name: &'static str| {
            find(name).ok_or_else(|| ColumnError::Missing {
                relation: format!("{}.{}", relation.namespace, relation.name),
                column: name,
            })
        };
        Ok(OutboxColumns {
            table: Bytes::copy_from_slice(relation.name.as_bytes()),
            id: need("id")?,
            created_at: need("created_at")?,
            tracking_id: need("tracking_id")?,
            aggregate_id: need("aggregate_id")?,
            aggregate_type: need("aggregate_type")?,
            event_type: need("event_type")?,
            payload: need("payload")?,
            metadata: find("metadata"),
            status: find("status"),
        })
    }

    /// The row's key `(id, created_at)` as text, when both are present: used
    /// to dead-letter a row even when the rest of it is unreadable.
    pub fn row_key(&self, tuple: &Tuple) -> Option<super::RowKey> {
        let id = text(tuple, self.id, "id").ok()?;
        let created_at = text(tuple, self.created_at, "created_at").ok()?;
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
            id: text(tuple, self.id, "id")?,
            created_at: text(tuple, self.created_at, "created_at")?,
            tracking_id: text(tuple, self.tracking_id, "tracking_id")?,
            aggregate_id: text(tuple, self.aggregate_id, "aggregate_id")?,
            aggregate_type: text(tuple, self.aggregate_type, "aggregate_type")?,
            event_type: text(tuple, self.event_type, "event_type")?,
            payload: text(tuple, self.payload, "payload")?,
            metadata: match self.metadata {
                Some(i) => match tuple.0.get(i) {
                    Some(TupleValue::Text(b)) => Some(b.clone()),
                    _ => None,
                },
                None => None,
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

//! Finding an outbox table's columns in a replicated relation by name,
//! through the table's [`ColumnMap`], and reading an [`OutboxEvent`] out of
//! a row's tuple without copying.

use bytes::Bytes;

use super::event::OutboxEvent;
use crate::config::{ColumnMap, Role};
use crate::pgoutput::{Relation, Tuple, TupleValue};

/// PostgreSQL's type oid of `bytea`.
const BYTEA_OID: u32 = 17;

/// `int8`, `int2`, `int4`: the row ids marking can address.
const INTEGER_OIDS: [u32; 3] = [20, 21, 23];

/// Positions of the mapped columns in a relation, found by name from its
/// Relation message (so column order and extra columns do not matter).
#[derive(Clone, Debug)]
pub struct OutboxColumns {
    table: Bytes,
    /// `schema.table`, for dead letters of rows that cannot be marked.
    qualified: String,
    /// Where each role's column is, with its name, in [`Role::ALL`] order.
    roles: Vec<Option<(usize, String)>>,
    /// Where each additional column is.
    additional: Vec<usize>,
    /// The row key `(id, created_at)` and `status`, when the table has
    /// them (marking needs all three, and an integer `id`).
    id: Option<usize>,
    created_at: Option<usize>,
    status: Option<usize>,
    bytea_payload: bool,
    /// [`super::RowKey::table`] of its rows (`None`: the relay's own table).
    key_table: Option<std::sync::Arc<str>>,
    /// Some column fills more than one field of the event, so reading one
    /// cannot take its values out of the tuple.
    shared: bool,
}

/// Why a row could not be read as an outbox event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ColumnError {
    /// The relation lacks a required column.
    #[error("relation {relation} has no column {column:?}, so it is not an outbox table (see [outbox.columns])")]
    Missing {
        /// `schema.table`.
        relation: String,
        /// The missing column.
        column: String,
    },
    /// The tuple has fewer values than the relation has columns.
    #[error("row has {got} values but the relation has column #{wanted}")]
    Short {
        /// Values in the tuple.
        got: usize,
        /// The index asked for.
        wanted: usize,
    },
    /// A required column is NULL, unchanged-TOAST, binary or not bytea text.
    #[error("column {column:?} is {kind}, expected a text value")]
    NotText {
        /// The column.
        column: String,
        /// What it was instead.
        kind: &'static str,
    },
}

impl OutboxColumns {
    /// Locates the columns of `map` in `relation`.
    pub fn from_relation(
        relation: &Relation,
        map: &ColumnMap,
        home: (&str, &str),
    ) -> Result<OutboxColumns, ColumnError> {
        let find = |name: &str| relation.columns.iter().position(|c| c.name == name);
        let qualified = format!("{}.{}", relation.namespace, relation.name);
        let missing = |column: &str| ColumnError::Missing {
            relation: qualified.clone(),
            column: column.to_string(),
        };
        let mut roles = Vec::with_capacity(Role::ALL.len());
        for role in Role::ALL {
            roles.push(match map.role(role) {
                None => None,
                Some(c) => match find(&c.name) {
                    Some(at) => Some((at, c.name.clone())),
                    None if c.required => return Err(missing(&c.name)),
                    None => None,
                },
            });
        }
        let additional = map
            .additional()
            .iter()
            .map(|c| find(c).ok_or_else(|| missing(c)))
            .collect::<Result<Vec<_>, _>>()?;
        let bytea_payload = roles[payload_index()]
            .as_ref()
            .is_some_and(|(at, _)| relation.columns[*at].type_oid == BYTEA_OID);
        let id = find("id").filter(|&i| INTEGER_OIDS.contains(&relation.columns[i].type_oid));
        let mut read: Vec<usize> = roles
            .iter()
            .flatten()
            .map(|(at, _)| *at)
            .chain(id)
            .chain(additional.iter().copied())
            .collect();
        let fields = read.len();
        read.sort_unstable();
        read.dedup();
        Ok(OutboxColumns {
            table: Bytes::copy_from_slice(relation.name.as_bytes()),
            qualified,
            roles,
            additional,
            shared: read.len() < fields,
            id,
            created_at: find("created_at"),
            status: find("status"),
            bytea_payload,
            key_table: super::key_table(&relation.namespace, &relation.name, home),
        })
    }

    /// `schema.table`.
    pub fn qualified(&self) -> &str {
        &self.qualified
    }

    /// The row's key `(id, created_at)` as text, when the table can be
    /// marked (it has `id`, `created_at` and `status`) and both are set:
    /// used to mark the row, or dead-letter it even when the rest of it is
    /// unreadable.
    pub fn row_key(&self, tuple: &Tuple) -> Option<super::RowKey> {
        self.status?;
        let id = text(tuple, self.id?, "id").ok()?;
        let created_at = text(tuple, self.created_at?, "created_at").ok()?;
        Some(super::RowKey::new(self.key_table.clone(), &id, &created_at))
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

    /// The role's value: an error for a NULL essential role, empty for
    /// another NULL role or an absent optional one.
    fn role(&self, read: &mut Read<'_>, role: Role) -> Result<Option<Bytes>, ColumnError> {
        let Some((at, name)) = &self.roles[Role::ALL.iter().position(|r| *r == role).unwrap_or(0)]
        else {
            return Ok(None);
        };
        match read(*at, name) {
            Ok(b) => Ok(Some(b)),
            Err(ColumnError::NotText { kind: "NULL", .. }) if role.may_be_null() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads the event from an inserted row.
    pub fn event(&self, tuple: &Tuple) -> Result<OutboxEvent, ColumnError> {
        self.read_event(&mut |i, column| text(tuple, i, column))
    }

    /// [`event`](Self::event), taking the values out of `tuple` (left
    /// `NULL`) instead of sharing them, unless a column fills more than
    /// one field. After an error the tuple may have lost values.
    pub fn take_event(&self, tuple: &mut Tuple) -> Result<OutboxEvent, ColumnError> {
        if self.shared {
            return self.event(tuple);
        }
        self.read_event(&mut |i, column| match tuple.0.get_mut(i) {
            Some(v @ TupleValue::Text(_)) => match std::mem::replace(v, TupleValue::Null) {
                TupleValue::Text(b) => Ok(b),
                _ => unreachable!("matched as text above"),
            },
            _ => text(tuple, i, column),
        })
    }

    /// The event, each column's text read through `read`.
    fn read_event(&self, read: &mut Read<'_>) -> Result<OutboxEvent, ColumnError> {
        let payload_text = self.role(read, Role::Payload)?;
        let payload_null = payload_text.is_none();
        let mut payload = payload_text.unwrap_or_default();
        if self.bytea_payload {
            payload = super::bytea::decode(&payload).ok_or_else(|| ColumnError::NotText {
                column: self.roles[payload_index()]
                    .as_ref()
                    .map(|r| r.1.clone())
                    .unwrap_or_default(),
                kind: "not bytea text",
            })?;
        }
        let value =
            |read: &mut Read<'_>, role| self.role(read, role).map(Option::unwrap_or_default);
        let created_at = value(read, Role::Timestamp)?;
        let tracking_id = value(read, Role::EventId)?;
        let aggregate_id = value(read, Role::AggregateId)?;
        let aggregate_type = value(read, Role::AggregateType)?;
        let event_type = value(read, Role::EventType)?;
        let metadata = self.role(read, Role::TraceContext)?;
        Ok(OutboxEvent {
            table: self.table.clone(),
            id: self.id.and_then(|i| read(i, "id").ok()).unwrap_or_default(),
            created_at,
            tracking_id,
            aggregate_id,
            aggregate_type,
            event_type,
            payload,
            payload_null,
            metadata,
            additional: self.additional.iter().map(|&i| read(i, "").ok()).collect(),
        })
    }

    /// The row as a JSON object of its mapped columns' text, for the dead
    /// letter of a row that cannot be marked.
    pub fn row_json(&self, tuple: &Tuple) -> Bytes {
        let mut row = serde_json::Map::new();
        for (at, name) in self.roles.iter().flatten() {
            let v = match tuple.0.get(*at) {
                Some(TupleValue::Text(b)) => {
                    serde_json::Value::String(String::from_utf8_lossy(b).into_owned())
                }
                _ => serde_json::Value::Null,
            };
            row.insert(name.clone(), v);
        }
        Bytes::from(serde_json::Value::Object(row).to_string())
    }
}

fn payload_index() -> usize {
    Role::ALL
        .iter()
        .position(|r| *r == Role::Payload)
        .unwrap_or(0)
}

/// How [`OutboxColumns::read_event`] gets the text of column `index`
/// (named `column` in errors).
type Read<'a> = dyn FnMut(usize, &str) -> Result<Bytes, ColumnError> + 'a;

fn text(tuple: &Tuple, index: usize, column: &str) -> Result<Bytes, ColumnError> {
    let not_text = |kind| ColumnError::NotText {
        column: column.to_string(),
        kind,
    };
    match tuple.0.get(index) {
        Some(TupleValue::Text(b)) => Ok(b.clone()),
        Some(TupleValue::Null) => Err(not_text("NULL")),
        Some(TupleValue::UnchangedToast) => Err(not_text("an unchanged TOAST value")),
        Some(TupleValue::Binary(_)) => Err(not_text("binary")),
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

    const HOME: (&str, &str) = ("public", "outbox");

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
                    type_oid: if *n == "id" { 20 } else { 25 },
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
        let cols =
            OutboxColumns::from_relation(&relation(&names), &ColumnMap::pgoutbox(), HOME).unwrap();
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
        let err =
            OutboxColumns::from_relation(&relation(&["id", "name"]), &ColumnMap::pgoutbox(), HOME)
                .unwrap_err();
        assert!(
            matches!(
                err,
                ColumnError::Missing { ref column, .. } if column == "tracking_id"
            ),
            "{err}"
        );
    }

    #[test]
    fn null_required_value_is_an_error_not_a_panic() {
        let cols =
            OutboxColumns::from_relation(&relation(COLS), &ColumnMap::pgoutbox(), HOME).unwrap();
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
            Err(ColumnError::NotText { ref column, .. }) if column == "aggregate_type"
        ));
        assert!(cols.row_key(&t).is_some());
        let short = tuple(&[Some("1")]);
        assert!(matches!(cols.event(&short), Err(ColumnError::Short { .. })));
    }

    #[test]
    fn a_row_key_does_not_hold_on_to_the_frame_it_was_read_from() {
        let cols =
            OutboxColumns::from_relation(&relation(COLS), &ColumnMap::pgoutbox(), HOME).unwrap();
        // One buffer behind every value, as a replication read gives them.
        let frame = Bytes::from_static(b"42|2026-12-05 04:00:00+00|PENDING|payload");
        let t = Tuple(
            [
                Some(frame.slice(0..2)),
                Some(frame.slice(33..40)),
                Some(frame.slice(33..40)),
                Some(frame.slice(33..40)),
                Some(frame.slice(33..40)),
                Some(frame.slice(34..40)),
                None,
                Some(frame.slice(26..33)),
                Some(frame.slice(3..25)),
            ]
            .into_iter()
            .map(|v| v.map_or(TupleValue::Null, TupleValue::Text))
            .collect(),
        );
        let key = cols.row_key(&t).unwrap();
        assert_eq!(&key.id[..], b"42");
        assert_eq!(&key.created_at[..], b"2026-12-05 04:00:00+00");
        let within = |b: &Bytes| frame.as_ptr_range().contains(&b.as_ptr());
        assert!(
            !within(&key.id) && !within(&key.created_at),
            "a key waiting for its mark would keep the whole read buffer alive"
        );
    }

    #[test]
    fn taking_the_event_reads_what_sharing_does_and_leaves_shared_columns() {
        let row = [
            Some("1"),
            Some("t"),
            Some("a"),
            Some("A"),
            Some("e"),
            Some("{}"),
            Some("{\"k\":1}"),
            Some("PENDING"),
            Some("c"),
        ];
        let cols =
            OutboxColumns::from_relation(&relation(COLS), &ColumnMap::pgoutbox(), HOME).unwrap();
        let mut t = tuple(&row);
        let shared = cols.event(&t).unwrap();
        assert_eq!(cols.take_event(&mut t).unwrap(), shared);
        let left: Vec<_> =
            t.0.iter()
                .map(|v| matches!(v, TupleValue::Text(_)))
                .collect();
        assert_eq!(
            left,
            [false, false, false, false, false, false, false, true, false],
            "every value the event holds was taken; status stays"
        );
        // The aggregate id doubling as the event type: both fields read it.
        let map = crate::config::ColumnsConfig {
            event_type: Some("aggregate_id".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let cols = OutboxColumns::from_relation(&relation(COLS), &map, HOME).unwrap();
        let mut t = tuple(&row);
        let e = cols.take_event(&mut t).unwrap();
        assert_eq!(
            (&e.aggregate_id[..], &e.event_type[..]),
            (&b"a"[..], &b"a"[..])
        );
        assert_eq!(e, cols.event(&tuple(&row)).unwrap());
    }

    #[test]
    fn rows_inserted_in_another_status_are_not_pending() {
        let cols =
            OutboxColumns::from_relation(&relation(COLS), &ColumnMap::pgoutbox(), HOME).unwrap();
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

    fn typed_relation(columns: &[(&str, u32)]) -> Relation {
        let mut r = relation(&columns.iter().map(|c| c.0).collect::<Vec<_>>());
        for (c, (_, oid)) in r.columns.iter_mut().zip(columns) {
            c.type_oid = *oid;
        }
        r
    }

    #[test]
    fn debeziums_table_is_read_through_its_preset_and_cannot_be_marked() {
        let map = crate::config::ColumnsConfig {
            preset: crate::config::TablePreset::Debezium,
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let r = typed_relation(&[
            ("id", 2950),
            ("aggregatetype", 1043),
            ("aggregateid", 1043),
            ("type", 1043),
            ("payload", BYTEA_OID),
        ]);
        let cols = OutboxColumns::from_relation(&r, &map, HOME).unwrap();
        let t = tuple(&[
            Some("0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00"),
            Some("Order"),
            Some("17"),
            Some("Created"),
            Some("\\x7b7d"),
        ]);
        let e = cols.event(&t).unwrap();
        assert_eq!(&e.tracking_id[..], b"0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00");
        assert_eq!(&e.payload[..], b"{}", "bytea decoded");
        assert_eq!(e.metadata, None, "no tracingspancontext column");
        assert!(e.created_at.is_empty());
        assert!(cols.row_key(&t).is_none(), "no status column: not markable");
        assert!(cols.is_pending(&t));
        let json: serde_json::Value = serde_json::from_slice(&cols.row_json(&t)).unwrap();
        assert_eq!(json["aggregateid"], "17");
        let bad = tuple(&[Some("x"), Some("A"), Some("1"), Some("T"), Some("\\q")]);
        assert!(matches!(
            cols.event(&bad),
            Err(ColumnError::NotText {
                kind: "not bytea text",
                ..
            })
        ));
        let no_type = typed_relation(&[
            ("id", 2950),
            ("aggregatetype", 25),
            ("aggregateid", 25),
            ("payload", 3802),
        ]);
        let cols = OutboxColumns::from_relation(&no_type, &map, HOME).unwrap();
        let e = cols
            .event(&tuple(&[Some("x"), Some("A"), Some("1"), Some("{}")]))
            .unwrap();
        assert!(e.event_type.is_empty(), "the event type is optional");
        let no_key = typed_relation(&[("id", 2950), ("aggregatetype", 25), ("payload", 3802)]);
        assert!(matches!(
            OutboxColumns::from_relation(&no_key, &map, HOME),
            Err(ColumnError::Missing { ref column, .. }) if column == "aggregateid"
        ));
    }
}

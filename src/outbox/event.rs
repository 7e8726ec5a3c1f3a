//! The outbox event: one row of an outbox table (or one table-less logical
//! message), as the sources read it and the pipeline publishes it.
//!
//! Every field is a text slice that shares the buffer it was read from (the
//! replication stream's, or a query's), so mapping a row copies nothing.
//! [`OUTBOX_COLUMNS`] is the one list of the columns an outbox table must
//! have; every reader (the CDC decoder's relation mapping, the backfill,
//! the poll claim) maps them to an event here.

use bytes::Bytes;

/// The columns every outbox table has, in the order [`OutboxEvent::from_text_row`]
/// takes them. `metadata` may be NULL.
pub const OUTBOX_COLUMNS: [&str; 8] = [
    "id",
    "created_at",
    "tracking_id",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "payload",
    "metadata",
];

/// The SQL select list that reads [`OUTBOX_COLUMNS`] as text from a table
/// aliased `alias`, in that order.
pub fn select_list(alias: &str) -> String {
    OUTBOX_COLUMNS
        .iter()
        .map(|c| format!("{alias}.{c}::text AS {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One outbox row (or table-less message) as read from the stream or the
/// table, as text slices that share the buffer they were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The table the row came from (its unqualified name).
    pub table: Bytes,
    /// `id` (bigserial) as text.
    pub id: Bytes,
    /// `created_at` as PostgreSQL prints it.
    pub created_at: Bytes,
    /// `tracking_id`, the id consumers deduplicate on.
    pub tracking_id: Bytes,
    /// `aggregate_id`: the Kafka key.
    pub aggregate_id: Bytes,
    /// `aggregate_type`.
    pub aggregate_type: Bytes,
    /// `event_type`.
    pub event_type: Bytes,
    /// `payload` (JSON text): the Kafka value, unchanged.
    pub payload: Bytes,
    /// `metadata` (JSON text), if present.
    pub metadata: Option<Bytes>,
}

impl OutboxEvent {
    /// The event in a row read with [`select_list`]: `text(i)` returns the
    /// text of column `i` of [`OUTBOX_COLUMNS`] (`None` for NULL). `table`
    /// is the unqualified table name. A NULL required column reads as empty
    /// text (the database's NOT NULL constraints rule that out).
    pub fn from_text_row(
        table: &Bytes,
        mut text: impl FnMut(usize) -> Option<String>,
    ) -> OutboxEvent {
        let mut required = |i: usize| Bytes::from(text(i).unwrap_or_default());
        OutboxEvent {
            table: table.clone(),
            id: required(0),
            created_at: required(1),
            tracking_id: required(2),
            aggregate_id: required(3),
            aggregate_type: required(4),
            event_type: required(5),
            payload: required(6),
            metadata: text(7).map(Bytes::from),
        }
    }

    /// W3C trace context from `metadata`, if it carries one.
    pub fn trace_context(&self) -> TraceContext {
        let Some(meta) = &self.metadata else {
            return TraceContext::default();
        };
        // Cheap pre-check: most events carry no trace context.
        if !contains(meta, b"trace") {
            return TraceContext::default();
        }
        #[derive(serde::Deserialize)]
        struct Meta {
            traceparent: Option<String>,
            tracestate: Option<String>,
        }
        match serde_json::from_slice::<Meta>(meta) {
            Ok(m) => TraceContext {
                traceparent: m.traceparent,
                tracestate: m.tracestate,
            },
            Err(_) => TraceContext::default(),
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// W3C trace context carried in `metadata`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// `traceparent` header value.
    pub traceparent: Option<String>,
    /// `tracestate` header value.
    pub tracestate: Option<String>,
}

#[cfg(test)]
pub(crate) fn sample_event() -> OutboxEvent {
    OutboxEvent {
        table: Bytes::from_static(b"outbox"),
        id: Bytes::from_static(b"42"),
        created_at: Bytes::from_static(b"2026-11-27 10:00:00.123456+00"),
        tracking_id: Bytes::from_static(b"0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00"),
        aggregate_id: Bytes::from_static(b"8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11"),
        aggregate_type: Bytes::from_static(b"Order"),
        event_type: Bytes::from_static(b"OrderCreated"),
        payload: Bytes::from_static(br#"{"total": 10}"#),
        metadata: Some(Bytes::from_static(
            br#"{"traceparent": "00-abc-def-01", "other": 1}"#,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_comes_from_metadata() {
        let mut e = sample_event();
        assert_eq!(
            e.trace_context().traceparent.as_deref(),
            Some("00-abc-def-01")
        );
        assert_eq!(e.trace_context().tracestate, None);
        e.metadata = Some(Bytes::from_static(b"{}"));
        assert_eq!(e.trace_context(), TraceContext::default());
        e.metadata = Some(Bytes::from_static(b"{\"traceparent\": 5}"));
        assert_eq!(e.trace_context(), TraceContext::default());
    }

    #[test]
    fn a_text_row_maps_column_for_column() {
        let e = sample_event();
        let cols: Vec<Option<String>> = vec![
            Some("42".into()),
            Some("2026-11-27 10:00:00.123456+00".into()),
            Some("0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00".into()),
            Some("8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11".into()),
            Some("Order".into()),
            Some("OrderCreated".into()),
            Some(r#"{"total": 10}"#.into()),
            Some(r#"{"traceparent": "00-abc-def-01", "other": 1}"#.into()),
        ];
        let got = OutboxEvent::from_text_row(&e.table, |i| cols[i].clone());
        assert_eq!(got, e);
        assert_eq!(
            select_list("o").matches("::text").count(),
            OUTBOX_COLUMNS.len()
        );
    }
}

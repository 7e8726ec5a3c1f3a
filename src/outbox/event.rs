//! The outbox event: one row of an outbox table (or one table-less logical
//! message), as the sources read it and the pipeline publishes it.
//!
//! Every field is a text slice that shares the buffer it was read from (the
//! replication stream's, or a query's), so mapping a row copies nothing.
//! Which column fills which field is the table's [`ColumnMap`]
//! (`[outbox.columns]`); every reader (the CDC decoder's relation mapping,
//! the backfill, the poll claim) maps rows through it.

use bytes::Bytes;

use crate::config::{ColumnMap, Role};

/// pgoutbox's own table's columns, in the order `pgoutbox migrate` creates
/// the ones events are read from.
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

/// The SQL select list that reads an event and its row key as text from a
/// table aliased `alias`: the roles of `map` in [`Role::ALL`] order (an
/// absent role reads as NULL), its additional columns, then `id` and
/// `created_at`. [`OutboxEvent::from_text_row`] reads it back.
pub fn select_list(map: &ColumnMap, alias: &str) -> String {
    let role = |r: Role| match map.name(r) {
        Some(c) => format!("{alias}.{}::text", crate::config::quote_ident(c)),
        None => "NULL::text".to_string(),
    };
    Role::ALL
        .into_iter()
        .map(role)
        .chain(
            map.additional()
                .iter()
                .map(|c| format!("{alias}.{}::text", crate::config::quote_ident(c))),
        )
        .chain([
            format!("{alias}.id::text"),
            format!("{alias}.created_at::text"),
        ])
        .collect::<Vec<_>>()
        .join(", ")
}

/// The number of columns [`select_list`] reads for `map`.
pub fn select_width(map: &ColumnMap) -> usize {
    Role::ALL.len() + map.additional().len() + 2
}

/// One outbox row (or table-less message) as read from the stream or the
/// table, as text slices that share the buffer they were read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    /// The table the row came from (its unqualified name).
    pub table: Bytes,
    /// The row's `id` as text (pgoutbox's bigserial), empty when the table
    /// has none.
    pub id: Bytes,
    /// The event's timestamp as PostgreSQL prints it (pgoutbox's
    /// `created_at`), empty when the table has none.
    pub created_at: Bytes,
    /// The event id consumers deduplicate on (pgoutbox's `tracking_id`).
    pub tracking_id: Bytes,
    /// The aggregate id: the Kafka key.
    pub aggregate_id: Bytes,
    /// The aggregate type.
    pub aggregate_type: Bytes,
    /// The event type, empty when the table has none.
    pub event_type: Bytes,
    /// The payload: the Kafka value, unchanged (a bytea payload decoded);
    /// empty when NULL.
    pub payload: Bytes,
    /// The payload is NULL (sent as a record without a value).
    pub payload_null: bool,
    /// The trace-context column (pgoutbox's `metadata`, JSON; Debezium's
    /// `tracingspancontext`, `key=value` lines), if present.
    pub metadata: Option<Bytes>,
    /// The map's additional columns, in its order (`None` for NULL).
    pub additional: Vec<Option<Bytes>>,
}

impl OutboxEvent {
    /// The event in a row read with [`select_list`] for `map`: `text(i)`
    /// returns the text of column `i` (`None` for NULL). `table` is the
    /// unqualified table name; `bytea_payload` says the payload column is
    /// bytea (its text is then decoded). A NULL essential column reads as
    /// empty text (the readers select only rows where they are set).
    pub fn from_text_row(
        map: &ColumnMap,
        table: &Bytes,
        bytea_payload: bool,
        mut text: impl FnMut(usize) -> Option<String>,
    ) -> (OutboxEvent, super::RowKey) {
        let mut value = |i: usize| text(i).map(Bytes::from);
        let mut v: Vec<Option<Bytes>> = (0..select_width(map)).map(&mut value).collect();
        let mut take = |i: usize| v[i].take();
        let roles = Role::ALL.len();
        let payload_text = take(4);
        let payload_null = payload_text.is_none();
        let mut payload = payload_text.unwrap_or_default();
        if bytea_payload {
            payload = super::bytea::decode(&payload).unwrap_or(payload);
        }
        let event = OutboxEvent {
            table: table.clone(),
            tracking_id: take(0).unwrap_or_default(),
            aggregate_type: take(1).unwrap_or_default(),
            aggregate_id: take(2).unwrap_or_default(),
            event_type: take(3).unwrap_or_default(),
            payload,
            payload_null,
            created_at: take(5).unwrap_or_default(),
            metadata: take(6),
            additional: (roles..roles + map.additional().len())
                .map(&mut take)
                .collect(),
            id: take(roles + map.additional().len()).unwrap_or_default(),
        };
        let created_at = take(roles + map.additional().len() + 1).unwrap_or_default();
        let key = super::RowKey::new(None, &event.id, &created_at);
        (event, key)
    }

    /// W3C trace context from the trace-context column, if it carries one:
    /// a JSON object with `traceparent` / `tracestate` (pgoutbox's
    /// `metadata`) or with them under `traceContext` (the polling
    /// framework's), or Java properties lines `traceparent=…` (what
    /// Debezium's `tracingspancontext` column holds).
    pub fn trace_context(&self) -> TraceContext {
        let Some(meta) = &self.metadata else {
            return TraceContext::default();
        };
        // Cheap pre-check: most events carry no trace context.
        if !contains(meta, b"trace") {
            return TraceContext::default();
        }
        if meta.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return properties_trace_context(meta);
        }
        #[derive(serde::Deserialize)]
        struct Trace {
            traceparent: Option<String>,
            tracestate: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Meta {
            traceparent: Option<String>,
            tracestate: Option<String>,
            /// The polling framework's nested form.
            #[serde(rename = "traceContext")]
            nested: Option<Trace>,
        }
        match serde_json::from_slice::<Meta>(meta) {
            Ok(Meta {
                traceparent: None,
                tracestate: None,
                nested: Some(t),
            }) => TraceContext {
                traceparent: t.traceparent,
                tracestate: t.tracestate,
            },
            Ok(m) => TraceContext {
                traceparent: m.traceparent,
                tracestate: m.tracestate,
            },
            Err(_) => TraceContext::default(),
        }
    }
}

impl TraceContext {
    /// Takes the trace context out of a metadata object already parsed
    /// (its `traceparent`, `tracestate` and `traceContext` entries): the
    /// answer [`OutboxEvent::trace_context`] gives for the same text, so
    /// that a record builder that reads the object for its headers anyway
    /// parses it once. A `traceparent`, `tracestate` or `traceContext` of
    /// the wrong JSON type means no trace context, as there.
    pub fn take_from(object: &mut serde_json::Map<String, serde_json::Value>) -> TraceContext {
        use serde_json::{Map, Value};
        /// `Ok(None)` for absent or null, `Err` for a value that is not text.
        fn text(object: &mut Map<String, Value>, key: &str) -> Result<Option<String>, ()> {
            match object.remove(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(()),
            }
        }
        let mut read = || -> Result<TraceContext, ()> {
            let top = TraceContext {
                traceparent: text(object, "traceparent")?,
                tracestate: text(object, "tracestate")?,
            };
            let nested = match object.remove("traceContext") {
                None | Some(Value::Null) => None,
                Some(Value::Object(mut inner)) => Some(TraceContext {
                    traceparent: text(&mut inner, "traceparent")?,
                    tracestate: text(&mut inner, "tracestate")?,
                }),
                Some(_) => return Err(()),
            };
            Ok(match nested {
                Some(inner) if top == TraceContext::default() => inner,
                _ => top,
            })
        };
        read().unwrap_or_default()
    }
}

/// `traceparent` / `tracestate` from `java.util.Properties` text: one
/// `key=value` (or `key: value`) per line, `#` and `!` comment lines.
fn properties_trace_context(text: &[u8]) -> TraceContext {
    let mut trace = TraceContext::default();
    for line in String::from_utf8_lossy(text).lines() {
        let line = line.trim();
        if line.starts_with(['#', '!']) {
            continue;
        }
        let Some(at) = line.find(['=', ':']) else {
            continue;
        };
        let (key, value) = (line[..at].trim(), line[at + 1..].trim());
        match key {
            "traceparent" => trace.traceparent = Some(value.to_string()),
            "tracestate" => trace.tracestate = Some(value.to_string()),
            _ => {}
        }
    }
    trace
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
        payload_null: false,
        metadata: Some(Bytes::from_static(
            br#"{"traceparent": "00-abc-def-01", "other": 1}"#,
        )),
        additional: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parsed_object_gives_the_same_trace_context_as_the_text() {
        let cases: [&[u8]; 12] = [
            br#"{"traceparent": "00-a-b-01"}"#,
            br#"{"traceparent": "00-a-b-01", "tracestate": "k=v", "tenant": "x"}"#,
            br#"{"tracestate": "k=v"}"#,
            br#"{"traceContext": {"traceparent": "00-n-b-01", "tracestate": "n=1"}}"#,
            br#"{"traceparent": "00-top-b-01", "traceContext": {"traceparent": "00-n-b-01"}}"#,
            br#"{"traceparent": null, "traceContext": {"traceparent": "00-n-b-01"}}"#,
            br#"{"traceparent": 5}"#,
            br#"{"tracestate": ["k"]}"#,
            br#"{"traceContext": "00-a-b-01"}"#,
            br#"{"traceContext": {"traceparent": 7}, "traceparent": "00-a-b-01"}"#,
            br#"{"traceContext": null, "tracestate": "k=v"}"#,
            br#"{"other": {"traceparent": "00-a-b-01"}}"#,
        ];
        let mut e = sample_event();
        for text in cases {
            e.metadata = Some(Bytes::from_static(text));
            let mut object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(text).unwrap();
            assert_eq!(
                TraceContext::take_from(&mut object),
                e.trace_context(),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
    }

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
    fn debeziums_properties_span_context_is_trace_context() {
        let mut e = sample_event();
        e.metadata = Some(Bytes::from_static(
            b"#Thu Dec 03 10:00:00 UTC 2026\ntraceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\ntracestate = k=v\n",
        ));
        let t = e.trace_context();
        assert_eq!(
            t.traceparent.as_deref(),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(t.tracestate.as_deref(), Some("k=v"));
    }

    #[test]
    fn a_text_row_maps_column_for_column() {
        let e = sample_event();
        let map = ColumnMap::pgoutbox();
        // Roles in Role::ALL order, then the row key.
        let cols: Vec<Option<String>> = vec![
            Some("0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00".into()),
            Some("Order".into()),
            Some("8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11".into()),
            Some("OrderCreated".into()),
            Some(r#"{"total": 10}"#.into()),
            Some("2026-11-27 10:00:00.123456+00".into()),
            Some(r#"{"traceparent": "00-abc-def-01", "other": 1}"#.into()),
            Some("42".into()),
            Some("2026-11-27 10:00:00.123456+00".into()),
        ];
        let (got, key) = OutboxEvent::from_text_row(&map, &e.table, false, |i| cols[i].clone());
        assert_eq!(got, e);
        assert_eq!(&key.id[..], b"42");
        assert_eq!(select_list(&map, "o").matches("::text").count(), cols.len());
        assert_eq!(select_width(&map), cols.len());
    }

    #[test]
    fn a_bytea_payload_is_decoded_and_absent_roles_are_empty() {
        let map = crate::config::ColumnsConfig {
            preset: crate::config::TablePreset::Debezium,
            additional: vec!["tenant".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let sql = select_list(&map, "o");
        assert!(sql.contains("aggregateid"), "{sql}");
        assert!(sql.contains("NULL::text"), "no timestamp column: {sql}");
        let cols: Vec<Option<String>> = vec![
            Some("0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00".into()),
            Some("Order".into()),
            Some("17".into()),
            None,
            Some("\\x7b7d".into()),
            None,
            None,
            Some("acme".into()),
            None,
            None,
        ];
        let table = Bytes::from_static(b"outbox");
        let (e, _) = OutboxEvent::from_text_row(&map, &table, true, |i| cols[i].clone());
        assert_eq!(&e.payload[..], b"{}");
        assert_eq!(&e.aggregate_id[..], b"17");
        assert!(e.event_type.is_empty() && e.created_at.is_empty() && e.id.is_empty());
        assert_eq!(e.additional, vec![Some(Bytes::from_static(b"acme"))]);
    }
}

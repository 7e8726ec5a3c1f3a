//! The table-less outbox: events written with
//! `pg_logical_emit_message(true, '<prefix>', <envelope>)` (what
//! `outbox_emit` does) instead of a row.
//!
//! The envelope is a JSON object:
//!
//! ```json
//! {"tracking_id": "<uuid>", "aggregate_type": "Order", "aggregate_id": "<uuid>",
//!  "event_type": "OrderCreated", "payload": {…}, "metadata": {…},
//!  "created_at": "2026-11-27 10:00:00.123456+00"}
//! ```
//!
//! `tracking_id`, `aggregate_type`, `aggregate_id`, `event_type` and `payload`
//! are required; `metadata` and `created_at` are optional. The Kafka value is
//! the `payload` exactly as it appears in the envelope (no re-serialisation),
//! sliced out of the message without copying.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::OutboxEvent;
use crate::outbox::RowKey;

/// Why a logical message is not a valid outbox envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed outbox envelope: {0}")]
pub struct EnvelopeError(String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    tracking_id: Cow<'a, str>,
    #[serde(borrow)]
    aggregate_type: Cow<'a, str>,
    #[serde(borrow)]
    aggregate_id: Cow<'a, str>,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    created_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    row: Option<RowRef<'a>>,
}

/// The outbox row an envelope stands for, when a redrive announced a row.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RowRef<'a> {
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    created_at: Cow<'a, str>,
}

/// `s` as bytes: a zero-copy slice when it lies inside `content` (the usual
/// case), a copy when JSON escapes made serde build a new string.
fn slice(content: &Bytes, s: &str) -> Bytes {
    let range = content.as_ptr_range();
    let inside = range.contains(&s.as_ptr()) && s.as_ptr() as usize + s.len() <= range.end as usize;
    if inside && !s.is_empty() {
        content.slice_ref(s.as_bytes())
    } else {
        Bytes::copy_from_slice(s.as_bytes())
    }
}

/// Reads an outbox event from a logical message's content (`prefix` becomes
/// the event's table name, for `{table}` routing), and the key of the outbox
/// row the message stands for when it carries one (`"row": {"table", "id", "created_at"}`, written
/// by `pgoutbox dle redrive`): the relay marks that row once delivered, and
/// the event's table is the row's.
pub fn parse_with_row(
    prefix: &str,
    content: &Bytes,
) -> Result<(OutboxEvent, Option<RowKey>), EnvelopeError> {
    let env: Envelope<'_> =
        serde_json::from_slice(content).map_err(|e| EnvelopeError(e.to_string()))?;
    for (field, value) in [
        ("tracking_id", &env.tracking_id),
        ("aggregate_id", &env.aggregate_id),
    ] {
        if uuid::Uuid::parse_str(value).is_err() {
            return Err(EnvelopeError(format!("{field} {value:?} is not a UUID")));
        }
    }
    for (field, value) in [
        ("aggregate_type", &env.aggregate_type),
        ("event_type", &env.event_type),
    ] {
        if value.is_empty() {
            return Err(EnvelopeError(format!("{field} is empty")));
        }
    }
    let key = env
        .row
        .as_ref()
        .map(|r| RowKey::new(None, r.id.as_bytes(), r.created_at.as_bytes()));
    if let Some(r) = &env.row {
        if r.id.parse::<i64>().is_err() {
            return Err(EnvelopeError(format!("row id {:?} is not a number", r.id)));
        }
    }
    let table = env.row.as_ref().map_or(prefix, |r| &r.table);
    let event = OutboxEvent {
        table: Bytes::copy_from_slice(table.as_bytes()),
        id: key.as_ref().map(|k| k.id.clone()).unwrap_or_default(),
        created_at: env
            .created_at
            .as_ref()
            .map(|c| slice(content, c))
            .unwrap_or_default(),
        tracking_id: slice(content, &env.tracking_id),
        aggregate_id: slice(content, &env.aggregate_id),
        aggregate_type: slice(content, &env.aggregate_type),
        event_type: slice(content, &env.event_type),
        payload: content.slice_ref(env.payload.get().as_bytes()),
        payload_null: false,
        metadata: env.metadata.map(|m| content.slice_ref(m.get().as_bytes())),
        additional: Vec::new(),
    };
    Ok((event, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"tracking_id": "0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00", "aggregate_type": "Order", "aggregate_id": "8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11", "event_type": "Created", "payload": {"b": [1, 2], "a": "x"}, "metadata": {"traceparent": "00-a-b-01"}, "created_at": "2026-11-27 10:00:00+00"}"#;

    #[test]
    fn payload_is_sliced_byte_for_byte() {
        let content = Bytes::from_static(GOOD.as_bytes());
        let e = parse_with_row("outbox", &content).unwrap().0;
        assert_eq!(&e.payload[..], br#"{"b": [1, 2], "a": "x"}"#);
        assert_eq!(&e.aggregate_type[..], b"Order");
        assert_eq!(&e.table[..], b"outbox");
        assert_eq!(e.trace_context().traceparent.as_deref(), Some("00-a-b-01"));
        assert_eq!(&e.created_at[..], b"2026-11-27 10:00:00+00");
    }

    #[test]
    fn a_redrive_announcement_names_its_row() {
        let text = GOOD.replace(
            "\"created_at\"",
            "\"row\": {\"table\": \"outbox\", \"id\": \"42\", \"created_at\": \"2026-11-27 10:00:00.000000+00\"}, \"created_at\"",
        );
        let (e, key) = parse_with_row("events", &Bytes::from(text)).unwrap();
        let key = key.expect("row key");
        assert_eq!(&key.id[..], b"42");
        assert_eq!(&key.created_at[..], b"2026-11-27 10:00:00.000000+00");
        assert_eq!(&e.table[..], b"outbox");
        assert_eq!(&e.id[..], b"42");
        assert!(
            parse_with_row("events", &Bytes::from_static(GOOD.as_bytes()))
                .unwrap()
                .1
                .is_none()
        );
        let bad = GOOD.replace(
            "\"created_at\"",
            "\"row\": {\"table\": \"outbox\", \"id\": \"x\", \"created_at\": \"c\"}, \"created_at\"",
        );
        assert!(parse_with_row("events", &Bytes::from(bad)).is_err());
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let text = GOOD.replace("\"Order\"", "\"Or\\u0064er\"");
        let e = parse_with_row("outbox", &Bytes::from(text)).unwrap().0;
        assert_eq!(&e.aggregate_type[..], b"Order");
    }

    #[test]
    fn malformed_envelopes_are_errors_not_panics() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"aggregate_type": "Order"}"#,
            &GOOD.replace("8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11", "nope"),
            &GOOD.replace("\"Created\"", "\"\""),
            &GOOD.replace("\"metadata\"", "\"extra\""),
        ] {
            assert!(
                parse_with_row("outbox", &Bytes::from(bad.to_owned())).is_err(),
                "{bad}"
            );
        }
    }
}

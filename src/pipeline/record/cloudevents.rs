//! The `cloudevents` record format: the CloudEvents 1.0 Kafka protocol
//! binding.
//!
//! - binary mode (the default): the attributes as `ce_` headers
//!   (`ce_specversion` 1.0, `ce_id` = the event's `tracking_id`,
//!   `ce_source`, `ce_type` = `event_type`, `ce_subject` = `aggregate_id`,
//!   `ce_time` = `created_at` in RFC 3339), `content-type:
//!   application/json`, the payload as the value; the trace context as the
//!   distributed-tracing extension (`ce_traceparent`, `ce_tracestate`);
//! - structured mode: `content-type: application/cloudevents+json;
//!   charset=UTF-8` and the whole event as one JSON object, the payload
//!   embedded as `data`.
//!
//! The key stays the aggregate id in both modes, so one aggregate's events
//! keep their order.

use bytes::Bytes;

use super::{KafkaRecord, RecordError};
use crate::config::{CloudEventsConfig, CloudEventsMode};
use crate::outbox::OutboxEvent;

/// The layout of CloudEvents records.
#[derive(Clone, Debug)]
pub(super) struct CloudEvents {
    mode: CloudEventsMode,
    source: String,
}

/// `created_at` as PostgreSQL prints a timestamptz (ISO date style:
/// `2026-11-27 10:00:00.123456+00`, `… +05:30`) in RFC 3339
/// (`2026-11-27T10:00:00.123456+00:00`).
pub(super) fn rfc3339(created_at: &str) -> String {
    let mut out = created_at.replacen(' ', "T", 1);
    // The offset: the last '+' or '-' after the time; `+00` needs minutes.
    if let Some(at) = out.rfind(['+', '-']).filter(|&i| i > 10) {
        let offset = &out[at + 1..];
        if offset.len() == 2 {
            out.push_str(":00");
        } else if offset.len() == 8 {
            // `+05:53:28` (seconds in historic offsets): RFC 3339 has none.
            out.truncate(at + 6);
        }
    }
    out
}

impl CloudEvents {
    /// The layout for `cfg`.
    pub(super) fn new(cfg: &CloudEventsConfig) -> CloudEvents {
        CloudEvents {
            mode: cfg.mode,
            source: cfg.source.clone(),
        }
    }

    /// The record for `event`, on `topic`.
    pub(super) fn build(
        &self,
        event: &OutboxEvent,
        topic: String,
    ) -> Result<KafkaRecord, RecordError> {
        let lossy = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
        let table = lossy(&event.table);
        let source = self.source.replace("{table}", &table);
        // `time` is optional; `type` is not: a table without an event type
        // gives its aggregate type.
        let time = (!event.created_at.is_empty()).then(|| rfc3339(&lossy(&event.created_at)));
        let kind = if event.event_type.is_empty() {
            lossy(&event.aggregate_type)
        } else {
            lossy(&event.event_type)
        };
        let trace = event.trace_context();
        let (value, headers) = match self.mode {
            CloudEventsMode::Binary => {
                let mut headers: Vec<(super::HeaderName, Option<Bytes>)> = vec![
                    ("ce_specversion".into(), Some(Bytes::from_static(b"1.0"))),
                    ("ce_id".into(), Some(event.tracking_id.clone())),
                    ("ce_source".into(), Some(Bytes::from(source))),
                    ("ce_type".into(), Some(Bytes::from(kind.clone()))),
                    ("ce_subject".into(), Some(event.aggregate_id.clone())),
                ];
                if let Some(time) = &time {
                    headers.push(("ce_time".into(), Some(Bytes::from(time.clone()))));
                }
                headers.push((
                    "content-type".into(),
                    Some(Bytes::from_static(b"application/json")),
                ));
                if let Some(tp) = trace.traceparent {
                    headers.push(("ce_traceparent".into(), Some(Bytes::from(tp))));
                }
                if let Some(ts) = trace.tracestate {
                    headers.push(("ce_tracestate".into(), Some(Bytes::from(ts))));
                }
                (
                    (!event.payload_null).then(|| event.payload.clone()),
                    headers,
                )
            }
            CloudEventsMode::Structured => {
                let data: Option<&serde_json::value::RawValue> = if event.payload_null {
                    None
                } else {
                    Some(serde_json::from_slice(&event.payload).map_err(|e| RecordError::Payload(
                        format!("the payload is not JSON, so it cannot be a structured CloudEvent's data: {e}"),
                    ))?)
                };
                let envelope = Envelope {
                    specversion: "1.0",
                    id: &lossy(&event.tracking_id),
                    source: &source,
                    r#type: &kind,
                    subject: &lossy(&event.aggregate_id),
                    time: time.as_deref(),
                    datacontenttype: "application/json",
                    traceparent: trace.traceparent.as_deref(),
                    tracestate: trace.tracestate.as_deref(),
                    data,
                };
                let json = serde_json::to_vec(&envelope)
                    .map_err(|e| RecordError::Payload(e.to_string()))?;
                let headers = vec![(
                    "content-type".into(),
                    Some(Bytes::from_static(
                        b"application/cloudevents+json; charset=UTF-8",
                    )),
                )];
                (Some(Bytes::from(json)), headers)
            }
        };
        Ok(KafkaRecord {
            topic,
            key: event.aggregate_id.clone(),
            tombstone: value.is_none(),
            value: value.unwrap_or_default(),
            headers,
            partition: None,
            timestamp: None,
        })
    }
}

/// A structured-mode event.
#[derive(serde::Serialize)]
struct Envelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    r#type: &'a str,
    subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    traceparent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a serde_json::value::RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::sample_event;

    fn header<'a>(r: &'a KafkaRecord, name: &str) -> Option<&'a [u8]> {
        r.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    #[test]
    fn timestamps_become_rfc_3339() {
        assert_eq!(
            rfc3339("2026-11-27 10:00:00.123456+00"),
            "2026-11-27T10:00:00.123456+00:00"
        );
        assert_eq!(
            rfc3339("2026-11-27 10:00:00+05:30"),
            "2026-11-27T10:00:00+05:30"
        );
        assert_eq!(
            rfc3339("2026-11-27 10:00:00-08"),
            "2026-11-27T10:00:00-08:00"
        );
        assert_eq!(
            rfc3339("1880-01-01 00:00:00+00:53:28"),
            "1880-01-01T00:00:00+00:53"
        );
    }

    #[test]
    fn binary_mode_puts_the_attributes_in_ce_headers() {
        let ce = CloudEvents::new(&CloudEventsConfig::default());
        let e = sample_event();
        let r = ce.build(&e, "t".into()).unwrap();
        assert_eq!(r.value, e.payload, "the payload is the data, unchanged");
        assert_eq!(r.key, e.aggregate_id);
        assert_eq!(header(&r, "ce_specversion"), Some(&b"1.0"[..]));
        assert_eq!(header(&r, "ce_id"), Some(&e.tracking_id[..]));
        assert_eq!(header(&r, "ce_source"), Some(&b"/pgoutbox/outbox"[..]));
        assert_eq!(header(&r, "ce_type"), Some(&b"OrderCreated"[..]));
        assert_eq!(header(&r, "ce_subject"), Some(&e.aggregate_id[..]));
        assert_eq!(
            header(&r, "ce_time"),
            Some(&b"2026-11-27T10:00:00.123456+00:00"[..])
        );
        assert_eq!(header(&r, "content-type"), Some(&b"application/json"[..]));
        assert_eq!(header(&r, "ce_traceparent"), Some(&b"00-abc-def-01"[..]));
        assert_eq!(header(&r, "ce_datacontenttype"), None);
    }

    #[test]
    fn structured_mode_embeds_the_payload_as_data() {
        let ce = CloudEvents::new(&CloudEventsConfig {
            mode: CloudEventsMode::Structured,
            source: "urn:shop".into(),
        });
        let e = sample_event();
        let r = ce.build(&e, "t".into()).unwrap();
        assert_eq!(r.headers.len(), 1, "structured mode: no ce_ headers");
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "0b6b7d5e-8c1a-4a51-9a3b-2f8d3c1e9f00");
        assert_eq!(v["source"], "urn:shop");
        assert_eq!(v["type"], "OrderCreated");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["data"], serde_json::json!({"total": 10}));
        let mut bad = e.clone();
        bad.payload = Bytes::from_static(b"not json");
        assert!(matches!(
            ce.build(&bad, "t".into()),
            Err(RecordError::Payload(_))
        ));
    }
}

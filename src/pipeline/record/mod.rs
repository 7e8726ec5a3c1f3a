//! From an outbox event to a Kafka record: the one place that decides a
//! record's topic, key, value and headers (ARCHITECTURE.md, "The Kafka
//! record"). Sinks only send what this builds.
//!
//! The contract:
//! - topic: a template over the event, default `{aggregate_type}.{event_type}`,
//!   or the event's table's own template (`kafka.table_topics`);
//! - key: `aggregate_id`, so one aggregate's events share a partition;
//! - value: `payload`, byte for byte as PostgreSQL sent it;
//! - headers: `tracking_id`, `aggregate_type`, `aggregate_id`, `event_type`,
//!   `created_at`, `traceparent` / `tracestate` when `metadata` holds them
//!   (or its `traceContext` object does), and the other top-level keys of
//!   `metadata` (`kafka.metadata_headers`: all by default, a list, or none).
//!
//! That is the `pgoutbox` format (`kafka.format`, the default); the
//! `debezium` format reproduces Debezium's Outbox Event Router
//! (`debezium.rs`) and `cloudevents` the CloudEvents Kafka binding
//! (`cloudevents.rs`).
//!
//! A record that can never be published (no legal topic, larger than
//! `kafka.message_max_bytes`) is a [`RecordError`]: the caller dead-letters
//! the event (ARCHITECTURE.md, invariant 5).

mod cloudevents;
mod connect;
mod debezium;
mod expand;

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;

use crate::config::{
    ColumnMap, ConfigError, KafkaConfig, MetadataHeaders, RecordFormat, TopicError, TopicField,
    TopicTemplate,
};
use crate::outbox::{OutboxEvent, TraceContext};

/// Kafka header names set on records.
pub mod header {
    /// The event id consumers deduplicate on.
    pub const TRACKING_ID: &str = "tracking_id";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "aggregate_type";
    /// The aggregate id (also the key).
    pub const AGGREGATE_ID: &str = "aggregate_id";
    /// The event type.
    pub const EVENT_TYPE: &str = "event_type";
    /// When the row was created, as PostgreSQL prints it.
    pub const CREATED_AT: &str = "created_at";
    /// W3C traceparent, when `metadata` has one.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C tracestate, when `metadata` has one.
    pub const TRACESTATE: &str = "tracestate";
    /// Set only on a record `pgoutbox replay` re-published: the id of the
    /// replay's audit entry (`<schema>.pgoutbox_replays`), in every format.
    pub const REPLAY: &str = "pgoutbox_replay";
    /// The headers above, and the polling framework's trace-context key:
    /// `metadata` keys with these names never become headers of their own
    /// (so no event can pass itself off as a replay).
    pub const RESERVED: [&str; 9] = [
        TRACKING_ID,
        AGGREGATE_TYPE,
        AGGREGATE_ID,
        EVENT_TYPE,
        CREATED_AT,
        TRACEPARENT,
        TRACESTATE,
        REPLAY,
        "traceContext",
    ];
}

/// Bytes a record costs beyond its key, value and header values (header
/// names, record framing), for the size estimate.
const RECORD_OVERHEAD: usize = 96;

/// A header's name.
pub type HeaderName = Cow<'static, str>;

/// One record, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaRecord {
    /// The topic.
    pub topic: String,
    /// The key (the aggregate id).
    pub key: Bytes,
    /// The value (the payload, unchanged in the `pgoutbox` format).
    pub value: Bytes,
    /// Sent without a value (a tombstone); `value` is then empty.
    pub tombstone: bool,
    /// Headers, in order; a `None` value is a header with a null value.
    pub headers: Vec<(HeaderName, Option<Bytes>)>,
    /// The partition, when the format chooses it (else the producer's
    /// partitioner does, by key).
    pub partition: Option<i32>,
    /// The record's timestamp in milliseconds since the epoch, when the
    /// format sets it (else the producer stamps the send time).
    pub timestamp: Option<i64>,
}

impl KafkaRecord {
    /// Bytes this record occupies in the producer (key + value + headers and
    /// framing), for the in-flight window and the size limit.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(_, v)| v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
            + RECORD_OVERHEAD
    }
}

/// Why an event has no record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No legal topic could be rendered for it.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Its payload cannot take the shape the format needs.
    #[error("{0}")]
    Payload(String),
    /// It is larger than the producer accepts.
    #[error("message of about {size} bytes exceeds kafka.message_max_bytes ({max})")]
    TooLarge {
        /// The record's estimated size.
        size: usize,
        /// `kafka.message_max_bytes`.
        max: usize,
    },
}

/// How a record is laid out (`kafka.format`).
#[derive(Clone, Debug)]
enum Layout {
    Pgoutbox,
    Debezium(Box<debezium::EventRouter>),
    CloudEvents(cloudevents::CloudEvents),
}

/// Checks a topic name against Kafka's rules.
fn check_topic(name: String) -> Result<String, TopicError> {
    TopicTemplate::check_name(name)
}

/// Builds records from events: picks the topic template (the table's own
/// when configured, by table name or `schema.table`, else the default) and
/// lays out key, value and headers in the configured format.
#[derive(Clone, Debug)]
pub struct RecordBuilder {
    default: TopicTemplate,
    per_table: Vec<(String, TopicTemplate)>,
    /// Every record goes to this topic instead of its routed one
    /// (`pgoutbox replay --topic`).
    topic_override: Option<String>,
    max_bytes: usize,
    layout: Layout,
    /// Which `metadata` keys become headers (pgoutbox's format).
    metadata_headers: MetadataHeaders,
}

impl RecordBuilder {
    /// A builder over `default` and per-table `(name, template)` pairs, with
    /// no size limit.
    pub fn new(default: TopicTemplate, per_table: Vec<(String, TopicTemplate)>) -> RecordBuilder {
        RecordBuilder {
            default,
            per_table,
            topic_override: None,
            max_bytes: usize::MAX,
            layout: Layout::Pgoutbox,
            metadata_headers: MetadataHeaders::All,
        }
    }

    /// The builder for the Kafka configuration (format, topics and size
    /// limit), reading events whose columns `map` says
    /// ([`crate::config::Config::event_columns`]).
    pub fn from_config(cfg: &KafkaConfig, map: &ColumnMap) -> Result<RecordBuilder, ConfigError> {
        let template = |field: &str, text: &str| {
            TopicTemplate::parse(text).map_err(|e| ConfigError::new(field, e.to_string()))
        };
        let default = template("kafka.topic", &cfg.topic)?;
        let per_table = cfg
            .table_topics
            .iter()
            .map(|(t, tpl)| {
                Ok((
                    t.clone(),
                    template(&format!("kafka.table_topics.{t}"), tpl)?,
                ))
            })
            .collect::<Result<_, ConfigError>>()?;
        let layout = match cfg.format {
            RecordFormat::Pgoutbox => Layout::Pgoutbox,
            RecordFormat::Debezium => {
                Layout::Debezium(Box::new(debezium::EventRouter::new(&cfg.debezium, map)?))
            }
            RecordFormat::Cloudevents => {
                Layout::CloudEvents(cloudevents::CloudEvents::new(&cfg.cloudevents))
            }
        };
        Ok(RecordBuilder {
            max_bytes: cfg.message_max_bytes,
            layout,
            metadata_headers: cfg.metadata_headers.clone(),
            ..RecordBuilder::new(default, per_table)
        })
    }

    /// Fits the layout to the outbox table's column types (`type_of`,
    /// `format_type` spelling): the `debezium` format renders placed
    /// columns as Debezium does per type, and refuses types it does not
    /// reproduce. Other formats need nothing.
    pub fn fit_table(
        &mut self,
        map: &ColumnMap,
        type_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        match &mut self.layout {
            Layout::Debezium(router) => router.fit_types(map, type_of),
            Layout::Pgoutbox | Layout::CloudEvents(_) => Ok(()),
        }
    }

    fn template(&self, table: &[u8]) -> &TopicTemplate {
        self.per_table
            .iter()
            .find(|(name, _)| {
                name.as_bytes() == table
                    || name
                        .rsplit_once('.')
                        .is_some_and(|(_, t)| t.as_bytes() == table)
            })
            .map(|(_, t)| t)
            .unwrap_or(&self.default)
    }

    /// Sends every record to `topic` instead of the topic its event routes
    /// to (whatever the format's routing says); the rest of the record is
    /// unchanged. Refuses a name Kafka would not take.
    pub fn route_all_to(&mut self, topic: &str) -> Result<(), TopicError> {
        self.topic_override = Some(check_topic(topic.to_owned())?);
        Ok(())
    }

    /// The topic for `event`, or why it has none.
    pub fn topic(&self, event: &OutboxEvent) -> Result<String, TopicError> {
        if let Some(topic) = &self.topic_override {
            return Ok(topic.clone());
        }
        if let Layout::Debezium(router) = &self.layout {
            return router.topic_for(event);
        }
        self.template(&event.table).render_with(|f| match f {
            TopicField::AggregateType => &event.aggregate_type[..],
            TopicField::EventType => &event.event_type[..],
            TopicField::Table => &event.table[..],
        })
    }

    /// The record for `event`, or why it can never be published.
    pub fn build(&self, event: &OutboxEvent) -> Result<KafkaRecord, RecordError> {
        let record = match &self.layout {
            Layout::Pgoutbox => self.pgoutbox(event.clone())?,
            Layout::Debezium(router) => router.build_on(event, self.topic(event)?)?,
            Layout::CloudEvents(ce) => ce.build(event, self.topic(event)?)?,
        };
        self.within_limit(record)
    }

    /// [`build`](Self::build), taking the event: in pgoutbox's own format
    /// its fields move into the record rather than being shared with it
    /// (the streaming path, one event at a time). On failure, the error
    /// and the topic the event routes to (empty when it has none).
    pub fn build_owned(&self, event: OutboxEvent) -> Result<KafkaRecord, (RecordError, String)> {
        if !matches!(self.layout, Layout::Pgoutbox) {
            return self
                .build(&event)
                .map_err(|e| (e, self.topic(&event).unwrap_or_default()));
        }
        let record = self.pgoutbox(event).map_err(|e| (e, String::new()))?;
        let topic = record.topic.clone();
        self.within_limit(record).map_err(|e| (e, topic))
    }

    /// `record`, unless it is larger than `kafka.message_max_bytes`.
    fn within_limit(&self, record: KafkaRecord) -> Result<KafkaRecord, RecordError> {
        let size = record.size();
        if size > self.max_bytes {
            return Err(RecordError::TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        Ok(record)
    }

    /// The record in pgoutbox's own format; the event's fields move into it.
    fn pgoutbox(&self, event: OutboxEvent) -> Result<KafkaRecord, RecordError> {
        let topic = self.topic(&event)?;
        // One parse of the metadata serves the trace context and the
        // headers taken from it (each event of a traced application has
        // both).
        let mut object = metadata_object(event.metadata.as_ref(), &self.metadata_headers);
        let trace = match &mut object {
            // Its trace entries are reserved names: never headers of
            // their own, so they may leave the object.
            Some(map) => TraceContext::take_from(map),
            None => event.trace_context(),
        };
        let OutboxEvent {
            tracking_id,
            aggregate_type,
            aggregate_id,
            event_type,
            created_at,
            payload,
            payload_null,
            ..
        } = event;
        let key = aggregate_id.clone();
        let mut headers = Vec::with_capacity(7);
        let mut push =
            |name: &'static str, value: Bytes| headers.push((Cow::Borrowed(name), Some(value)));
        push(header::TRACKING_ID, tracking_id);
        push(header::AGGREGATE_TYPE, aggregate_type);
        push(header::AGGREGATE_ID, aggregate_id);
        push(header::EVENT_TYPE, event_type);
        push(header::CREATED_AT, created_at);
        if let Some(tp) = trace.traceparent {
            push(header::TRACEPARENT, Bytes::from(tp));
        }
        if let Some(ts) = trace.tracestate {
            push(header::TRACESTATE, Bytes::from(ts));
        }
        if let Some(map) = object {
            metadata_headers(map, &self.metadata_headers, &mut headers);
        }
        Ok(KafkaRecord {
            topic,
            key,
            value: payload,
            tombstone: payload_null,
            headers,
            partition: None,
            timestamp: None,
        })
    }
}

/// An event's `metadata` as a JSON object, when `which` takes headers
/// from it and it is a non-empty object; `None` otherwise (and for text
/// that is not JSON).
fn metadata_object(
    metadata: Option<&Bytes>,
    which: &MetadataHeaders,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let meta = metadata?;
    if *which == MetadataHeaders::None {
        return None;
    }
    let body = meta.trim_ascii();
    if body.first() != Some(&b'{') || body == b"{}" {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The top-level keys of an event's `metadata` object that `which` selects,
/// as headers (a string as the string, anything else as its JSON text),
/// sorted by key; never one of pgoutbox's own ([`header::RESERVED`]).
/// Metadata that is not a JSON object adds none (see [`metadata_object`]).
fn metadata_headers(
    object: serde_json::Map<String, serde_json::Value>,
    which: &MetadataHeaders,
    headers: &mut Vec<(HeaderName, Option<Bytes>)>,
) {
    for (key, value) in object {
        if header::RESERVED.contains(&key.as_str()) || !which.includes(&key) {
            continue;
        }
        let value = match value {
            serde_json::Value::String(s) => Bytes::from(s),
            other => Bytes::from(other.to_string()),
        };
        headers.push((Cow::Owned(key), Some(value)));
    }
}

impl fmt::Display for RecordBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Layout::Debezium(router) = &self.layout {
            return write!(f, "{router}");
        }
        write!(f, "{}", self.default)?;
        for (t, tpl) in &self.per_table {
            write!(f, ", {t}: {tpl}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::sample_event;

    fn builder(template: &str) -> RecordBuilder {
        RecordBuilder::new(TopicTemplate::parse(template).unwrap(), vec![])
    }

    #[test]
    fn default_template_routes_by_type_and_event() {
        let b = builder("{aggregate_type}.{event_type}");
        assert_eq!(b.topic(&sample_event()).unwrap(), "Order.OrderCreated");
        assert_eq!(b.to_string(), "{aggregate_type}.{event_type}");
    }

    #[test]
    fn fixed_and_partial_templates() {
        let e = sample_event();
        assert_eq!(builder("events").topic(&e).unwrap(), "events");
        assert_eq!(builder("{aggregate_type}").topic(&e).unwrap(), "Order");
        assert_eq!(
            builder("svc.{table}.{aggregate_type}").topic(&e).unwrap(),
            "svc.outbox.Order"
        );
    }

    #[test]
    fn illegal_rendered_names_are_errors_not_panics() {
        let b = builder("{aggregate_type}.{event_type}");
        let mut e = sample_event();
        e.event_type = Bytes::from_static(b"Order Created!");
        assert!(matches!(
            b.build(&e),
            Err(RecordError::Topic(TopicError::Name { .. }))
        ));
        e.event_type = Bytes::from(vec![b'x'; 300]);
        assert!(matches!(b.topic(&e), Err(TopicError::Name { .. })));
        e.event_type = Bytes::from_static("é".as_bytes());
        assert!(b.topic(&e).is_err());
        e.event_type = Bytes::from_static(b"..");
        assert!(builder("{event_type}").topic(&e).is_err());
    }

    #[test]
    fn tables_route_by_their_own_template() {
        let b = RecordBuilder::new(
            TopicTemplate::parse("{aggregate_type}.{event_type}").unwrap(),
            vec![
                (
                    "billing_outbox".into(),
                    TopicTemplate::parse("billing.{event_type}").unwrap(),
                ),
                (
                    "shop.orders_outbox".into(),
                    TopicTemplate::parse("orders").unwrap(),
                ),
            ],
        );
        let mut e = sample_event();
        assert_eq!(b.topic(&e).unwrap(), "Order.OrderCreated");
        e.table = Bytes::from_static(b"billing_outbox");
        assert_eq!(b.topic(&e).unwrap(), "billing.OrderCreated");
        e.table = Bytes::from_static(b"orders_outbox");
        assert_eq!(b.topic(&e).unwrap(), "orders");
    }

    #[test]
    fn a_record_carries_key_value_and_the_contract_headers() {
        let e = sample_event();
        let r = builder("{aggregate_type}.{event_type}").build(&e).unwrap();
        assert_eq!(r.topic, "Order.OrderCreated");
        assert_eq!(r.key, e.aggregate_id);
        assert_eq!(r.value, e.payload, "the payload goes out byte for byte");
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(
            names,
            [
                "tracking_id",
                "aggregate_type",
                "aggregate_id",
                "event_type",
                "created_at",
                "traceparent",
                "other"
            ],
            "the contract's headers, then metadata's other keys"
        );
        assert_eq!(r.headers[5].1, Some(Bytes::from_static(b"00-abc-def-01")));
        let mut plain = e.clone();
        plain.metadata = None;
        let r = builder("t").build(&plain).unwrap();
        assert_eq!(r.headers.len(), 5, "no trace context, no trace headers");
    }

    #[test]
    fn metadata_keys_become_headers_and_the_frameworks_trace_context_is_understood() {
        let mut e = sample_event();
        e.metadata = Some(Bytes::from_static(
            br#"{"tenant": "acme", "schema_version": 2, "emitted_at": "2026-12-03T10:00:00Z",
                 "flags": {"a": [1, true]}, "tracking_id": "forged", "empty": null,
                 "traceContext": {"traceparent": "00-fw-01", "tracestate": "k=v"}}"#,
        ));
        let headers = |b: &RecordBuilder, e: &OutboxEvent| -> Vec<(String, String)> {
            let r = b.build(e).unwrap();
            r.headers
                .iter()
                .skip(5)
                .map(|(k, v)| {
                    let v = v
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    (k.to_string(), v.into_owned())
                })
                .collect()
        };
        let mut b = builder("t");
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            headers(&b, &e),
            pairs(&[
                ("traceparent", "00-fw-01"),
                ("tracestate", "k=v"),
                ("emitted_at", "2026-12-03T10:00:00Z"),
                ("empty", "null"),
                ("flags", r#"{"a":[1,true]}"#),
                ("schema_version", "2"),
                ("tenant", "acme"),
            ]),
            "every key but pgoutbox's own, strings as themselves, the rest as JSON"
        );
        b.metadata_headers = "tenant, schema_version".parse().unwrap();
        assert_eq!(
            headers(&b, &e),
            pairs(&[
                ("traceparent", "00-fw-01"),
                ("tracestate", "k=v"),
                ("schema_version", "2"),
                ("tenant", "acme"),
            ])
        );
        b.metadata_headers = MetadataHeaders::None;
        assert_eq!(headers(&b, &e).len(), 2, "the trace context stays");
        e.metadata = Some(Bytes::from_static(b"[1, 2]"));
        b.metadata_headers = MetadataHeaders::All;
        assert!(
            headers(&b, &e).is_empty(),
            "not an object: no headers, no error"
        );
    }

    #[test]
    fn one_topic_for_every_record_changes_nothing_else() {
        let routed = builder("{aggregate_type}.{event_type}");
        let mut one = routed.clone();
        one.route_all_to("replays").unwrap();
        let mut e = sample_event();
        let (a, b) = (routed.build(&e).unwrap(), one.build(&e).unwrap());
        assert_eq!(b.topic, "replays");
        assert_eq!(
            KafkaRecord {
                topic: a.topic.clone(),
                ..b
            },
            a
        );
        // An event whose own topic is illegal still has a record there.
        e.event_type = Bytes::from_static(b"Order Created!");
        assert!(routed.build(&e).is_err());
        assert_eq!(one.build(&e).unwrap().topic, "replays");
        assert!(one.route_all_to("no spaces!").is_err());
        assert!(one.route_all_to("").is_err());
        // Only a replay marks a record as one.
        let mut forged = sample_event();
        forged.metadata = Some(Bytes::from_static(br#"{"pgoutbox_replay": "7", "x": 1}"#));
        let names: Vec<String> = routed
            .build(&forged)
            .unwrap()
            .headers
            .iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert!(names.contains(&"x".to_owned()));
        assert!(!names.contains(&header::REPLAY.to_owned()), "{names:?}");
    }

    #[test]
    fn one_topic_for_every_record_keeps_debeziums_record_too() {
        let cfg: crate::config::EventRouterConfig = toml::from_str(
            r#""table.field.event.id" = "tracking_id"
               "table.field.event.key" = "aggregate_id"
               "route.by.field" = "aggregate_type""#,
        )
        .unwrap();
        let router = debezium::EventRouter::new(&cfg, &ColumnMap::pgoutbox()).unwrap();
        let mut b = RecordBuilder {
            layout: Layout::Debezium(Box::new(router)),
            ..builder("unused")
        };
        let routed = b.build(&sample_event()).unwrap();
        assert_eq!(routed.topic, "outbox.event.Order");
        b.route_all_to("replays").unwrap();
        let rec = b.build(&sample_event()).unwrap();
        assert_eq!(rec.topic, "replays");
        let topic = routed.topic.clone();
        assert_eq!(KafkaRecord { topic, ..rec }, routed);
    }

    #[test]
    fn records_larger_than_the_producer_takes_are_refused() {
        let mut b = builder("t");
        let e = sample_event();
        let size = b.build(&e).unwrap().size();
        b.max_bytes = size - 1;
        assert_eq!(
            b.build(&e),
            Err(RecordError::TooLarge {
                size,
                max: size - 1
            })
        );
        b.max_bytes = size;
        assert!(b.build(&e).is_ok());
    }

    #[test]
    fn taking_the_event_builds_the_same_record_and_names_the_topic_of_a_refusal() {
        let mut b = builder("{aggregate_type}.{event_type}");
        let mut e = sample_event();
        e.metadata = Some(Bytes::from_static(
            br#"{"traceparent": "00-abc-def-01", "tenant": "acme"}"#,
        ));
        let shared = b.build(&e).unwrap();
        assert_eq!(b.build_owned(e.clone()).unwrap(), shared);
        let names: Vec<&str> = shared.headers.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(
            names[..6],
            [
                header::TRACKING_ID,
                header::AGGREGATE_TYPE,
                header::AGGREGATE_ID,
                header::EVENT_TYPE,
                header::CREATED_AT,
                header::TRACEPARENT
            ]
        );
        assert!(names.contains(&"tenant"), "{names:?}");
        assert_eq!(shared.key, e.aggregate_id);
        b.max_bytes = shared.size() - 1;
        let (err, topic) = b.build_owned(e.clone()).unwrap_err();
        assert!(matches!(err, RecordError::TooLarge { .. }), "{err}");
        assert_eq!(topic, shared.topic);
        e.event_type = Bytes::from_static(b"not a topic!");
        let (_, topic) = b.build_owned(e).unwrap_err();
        assert_eq!(topic, "", "no topic to count a refusal under");
    }
}

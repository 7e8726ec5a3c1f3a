//! From an outbox row to a Kafka record: topic, key, value and headers.
//!
//! The contract (DESIGN.md, "The Kafka record contract"):
//! - topic: a template over the row, default `{aggregate_type}.{event_type}`;
//! - key: `aggregate_id`, so one aggregate's events share a partition;
//! - value: `payload`, byte for byte as PostgreSQL sent it;
//! - headers: `tracking_id`, `aggregate_type`, `aggregate_id`, `event_type`,
//!   `created_at`, and `traceparent` / `tracestate` when `metadata` holds them.

use std::fmt;

use bytes::Bytes;

/// One outbox row as read from the stream or the table, as text slices that
/// share the replication buffer (no copies).
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
    /// Bytes this event occupies in the producer (value + key + headers), for
    /// the in-flight window and the size limit.
    pub fn wire_size(&self) -> usize {
        self.payload.len()
            + self.aggregate_id.len() * 2
            + self.tracking_id.len()
            + self.aggregate_type.len()
            + self.event_type.len()
            + self.created_at.len()
            + 96
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

/// A placeholder in a topic template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    AggregateType,
    EventType,
    Table,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A compiled topic template such as `{aggregate_type}.{event_type}`,
/// `{aggregate_type}` or `orders` (a fixed topic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

/// Why a template or a rendered topic name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The template has an unknown `{placeholder}` or an unclosed brace.
    #[error("invalid topic template {template:?}: {why}")]
    Template {
        /// The template text.
        template: String,
        /// What is wrong.
        why: String,
    },
    /// The rendered name is not a legal Kafka topic name.
    #[error("invalid topic name {name:?}: {why}")]
    Name {
        /// The rendered (possibly truncated) name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
}

const MAX_TOPIC_LEN: usize = 249;

fn legal_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

impl TopicTemplate {
    /// Compiles a template. Literal text must itself be legal in a topic name.
    pub fn parse(template: &str) -> Result<Self, TopicError> {
        let bad = |why: String| TopicError::Template {
            template: template.to_owned(),
            why,
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let close = rest.find('}').ok_or_else(|| bad("unclosed '{'".into()))?;
                    let field = match &rest[1..close] {
                        "aggregate_type" => Field::AggregateType,
                        "event_type" => Field::EventType,
                        "table" => Field::Table,
                        other => {
                            return Err(bad(format!(
                                "unknown placeholder {{{other}}}; use {{aggregate_type}}, {{event_type}} or {{table}}"
                            )))
                        }
                    };
                    parts.push(Part::Field(field));
                    rest = &rest[close + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let lit = &rest[..end];
                    if lit.contains('}') {
                        return Err(bad("unmatched '}'".into()));
                    }
                    if !lit.bytes().all(legal_topic_byte) {
                        return Err(bad(format!(
                            "literal {lit:?} may only contain letters, digits, '.', '_' and '-'"
                        )));
                    }
                    parts.push(Part::Literal(lit.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err(bad("is empty".into()));
        }
        // The literal text alone must leave room in Kafka's name limit, and a
        // fixed name must be one Kafka accepts.
        let literal_len: usize = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                Part::Field(_) => 0,
            })
            .sum();
        if literal_len > MAX_TOPIC_LEN {
            return Err(bad(format!(
                "its fixed text is {literal_len} characters; Kafka topic names are at most {MAX_TOPIC_LEN}"
            )));
        }
        if template == "." || template == ".." {
            return Err(bad("'.' and '..' are reserved topic names".into()));
        }
        Ok(TopicTemplate { parts })
    }

    /// Renders the topic for an event, checking Kafka's naming rules.
    pub fn render(&self, event: &OutboxEvent) -> Result<String, TopicError> {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            let bytes: &[u8] = match part {
                Part::Literal(s) => s.as_bytes(),
                Part::Field(Field::AggregateType) => &event.aggregate_type,
                Part::Field(Field::EventType) => &event.event_type,
                Part::Field(Field::Table) => &event.table,
            };
            if !bytes.iter().copied().all(legal_topic_byte) {
                return Err(TopicError::Name {
                    name: truncated(&out, bytes),
                    why: "only letters, digits, '.', '_' and '-' are allowed",
                });
            }
            // All bytes are ASCII here.
            out.push_str(std::str::from_utf8(bytes).unwrap_or_default());
        }
        if out.is_empty() {
            return Err(TopicError::Name {
                name: out,
                why: "is empty",
            });
        }
        if out.len() > MAX_TOPIC_LEN {
            return Err(TopicError::Name {
                name: out[..64].to_owned(),
                why: "is longer than 249 characters",
            });
        }
        if out == "." || out == ".." {
            return Err(TopicError::Name {
                name: out,
                why: "'.' and '..' are reserved",
            });
        }
        Ok(out)
    }
}

fn truncated(prefix: &str, bytes: &[u8]) -> String {
    let mut s = prefix.to_owned();
    s.push_str(&String::from_utf8_lossy(&bytes[..bytes.len().min(64)]));
    s
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.parts {
            match p {
                Part::Literal(s) => f.write_str(s)?,
                Part::Field(Field::AggregateType) => f.write_str("{aggregate_type}")?,
                Part::Field(Field::EventType) => f.write_str("{event_type}")?,
                Part::Field(Field::Table) => f.write_str("{table}")?,
            }
        }
        Ok(())
    }
}

/// Picks the topic template for an event: the table's own template when one
/// is configured (by table name or `schema.table`), else the default.
#[derive(Clone, Debug)]
pub struct Router {
    default: TopicTemplate,
    per_table: Vec<(String, TopicTemplate)>,
}

impl Router {
    /// A router over `default` and per-table `(name, template)` pairs.
    pub fn new(default: TopicTemplate, per_table: Vec<(String, TopicTemplate)>) -> Router {
        Router { default, per_table }
    }

    /// Builds the router from the Kafka configuration.
    pub fn from_config(cfg: &crate::config::KafkaConfig) -> Result<Router, TopicError> {
        let default = TopicTemplate::parse(&cfg.topic)?;
        let per_table = cfg
            .table_topics
            .iter()
            .map(|(t, tpl)| Ok((t.clone(), TopicTemplate::parse(tpl)?)))
            .collect::<Result<_, TopicError>>()?;
        Ok(Router::new(default, per_table))
    }

    /// The topic for `event`, or why it has none.
    pub fn render(&self, event: &OutboxEvent) -> Result<String, TopicError> {
        let template = self
            .per_table
            .iter()
            .find(|(name, _)| {
                name.as_bytes() == &event.table[..]
                    || name
                        .rsplit_once('.')
                        .is_some_and(|(_, t)| t.as_bytes() == &event.table[..])
            })
            .map(|(_, t)| t)
            .unwrap_or(&self.default);
        template.render(event)
    }
}

impl fmt::Display for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.default)?;
        for (t, tpl) in &self.per_table {
            write!(f, ", {t}: {tpl}")?;
        }
        Ok(())
    }
}

/// Kafka header names set on every record.
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
    fn fixed_names_longer_than_kafka_allows_are_refused_at_parse_time() {
        assert!(TopicTemplate::parse(&"t".repeat(249)).is_ok());
        let e = TopicTemplate::parse(&"t".repeat(250)).unwrap_err();
        assert!(e.to_string().contains("at most 249"), "{e}");
        assert!(TopicTemplate::parse(&format!("{}.{{event_type}}", "t".repeat(250))).is_err());
        assert!(TopicTemplate::parse("..").is_err());
    }

    #[test]
    fn default_template_routes_by_type_and_event() {
        let t = TopicTemplate::parse("{aggregate_type}.{event_type}").unwrap();
        assert_eq!(t.render(&sample_event()).unwrap(), "Order.OrderCreated");
        assert_eq!(t.to_string(), "{aggregate_type}.{event_type}");
    }

    #[test]
    fn fixed_and_partial_templates() {
        let e = sample_event();
        assert_eq!(
            TopicTemplate::parse("events").unwrap().render(&e).unwrap(),
            "events"
        );
        assert_eq!(
            TopicTemplate::parse("{aggregate_type}")
                .unwrap()
                .render(&e)
                .unwrap(),
            "Order"
        );
        assert_eq!(
            TopicTemplate::parse("svc.{table}.{aggregate_type}")
                .unwrap()
                .render(&e)
                .unwrap(),
            "svc.outbox.Order"
        );
    }

    #[test]
    fn bad_templates_are_rejected() {
        for t in [
            "",
            "{nope}",
            "{aggregate_type",
            "a}b",
            "a b",
            "a/{event_type}",
        ] {
            assert!(TopicTemplate::parse(t).is_err(), "{t:?}");
        }
    }

    #[test]
    fn illegal_rendered_names_are_errors_not_panics() {
        let t = TopicTemplate::parse("{aggregate_type}.{event_type}").unwrap();
        let mut e = sample_event();
        e.event_type = Bytes::from_static(b"Order Created!");
        assert!(matches!(t.render(&e), Err(TopicError::Name { .. })));
        e.event_type = Bytes::from(vec![b'x'; 300]);
        assert!(matches!(t.render(&e), Err(TopicError::Name { .. })));
        e.event_type = Bytes::from_static("é".as_bytes());
        assert!(t.render(&e).is_err());
        let t = TopicTemplate::parse("{event_type}").unwrap();
        e.event_type = Bytes::from_static(b"..");
        assert!(t.render(&e).is_err());
    }

    #[test]
    fn tables_route_by_their_own_template() {
        let router = Router::new(
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
        assert_eq!(router.render(&e).unwrap(), "Order.OrderCreated");
        e.table = Bytes::from_static(b"billing_outbox");
        assert_eq!(router.render(&e).unwrap(), "billing.OrderCreated");
        e.table = Bytes::from_static(b"orders_outbox");
        assert_eq!(router.render(&e).unwrap(), "orders");
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
}

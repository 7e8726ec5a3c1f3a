//! The `debezium` record format: what Debezium's Outbox Event Router
//! (`io.debezium.transforms.outbox.EventRouter`) produces from the same row
//! with the same options, byte for byte with Kafka Connect's string
//! converter (`kafka.debezium.converter = "string"`, the default) or its
//! JSON converter without schemas (`"json"`).
//!
//! - topic: the `route.by.field` column's value, through Kafka's
//!   `RegexRouter`: when `route.topic.regex` matches the whole value, the
//!   first match is replaced by `route.topic.replacement` (Java replacement
//!   syntax: `$n`, `${name}`, `\x`); otherwise the value itself;
//! - key: the `table.field.event.key` column;
//! - value: the `table.field.event.payload` column's text (a JSON string
//!   literal with the JSON converter), or no value (a tombstone) for an
//!   empty payload with `route.tombstone.on.empty.payload`;
//! - headers: `id` (the `table.field.event.id` column), then each
//!   `table.fields.additional.placement` column placed as a header, under
//!   its alias. Header values are the columns' text, as Connect's
//!   `SimpleHeaderConverter` writes strings.
//!
//! Not produced: Debezium's own `__debezium.context.*` headers (connector
//! name, task id, a random run id per start; Debezium 3.2+) and the
//! tracing headers of its OpenTelemetry integration (a new span per event).

use bytes::Bytes;
use regex::Regex;

use super::{KafkaRecord, RecordError};
use crate::config::{ConfigError, DebeziumConverter, EventRouterConfig, TopicError};
use crate::outbox::OutboxEvent;

/// A column of the outbox table, as the router's options name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Id,
    CreatedAt,
    TrackingId,
    AggregateId,
    AggregateType,
    EventType,
    Payload,
    Metadata,
}

impl Column {
    const ALL: [(&'static str, Column); 8] = [
        ("id", Column::Id),
        ("created_at", Column::CreatedAt),
        ("tracking_id", Column::TrackingId),
        ("aggregate_id", Column::AggregateId),
        ("aggregate_type", Column::AggregateType),
        ("event_type", Column::EventType),
        ("payload", Column::Payload),
        ("metadata", Column::Metadata),
    ];

    /// The column `name` of the outbox table, or a configuration error for
    /// `option`.
    fn named(option: &str, name: &str) -> Result<Column, ConfigError> {
        Column::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| *c)
            .ok_or_else(|| {
                let names: Vec<&str> = Column::ALL.iter().map(|(n, _)| *n).collect();
                ConfigError::new(
                    format!("kafka.debezium.{option}"),
                    format!(
                        "{name:?} is not a column of the outbox table (it has {}); set the option to one of them",
                        names.join(", ")
                    ),
                )
            })
    }

    /// The column's text in `event` (`None` for a NULL `metadata`).
    fn of(self, event: &OutboxEvent) -> Option<&Bytes> {
        match self {
            Column::Id => Some(&event.id),
            Column::CreatedAt => Some(&event.created_at),
            Column::TrackingId => Some(&event.tracking_id),
            Column::AggregateId => Some(&event.aggregate_id),
            Column::AggregateType => Some(&event.aggregate_type),
            Column::EventType => Some(&event.event_type),
            Column::Payload => Some(&event.payload),
            Column::Metadata => event.metadata.as_ref(),
        }
    }
}

/// The router's options, resolved against the outbox table's columns.
#[derive(Clone, Debug)]
pub(super) struct EventRouter {
    id: Column,
    key: Column,
    payload: Column,
    route_by: Column,
    /// `route.topic.regex`, anchored at both ends (Java's `matches()`).
    whole: Regex,
    /// `route.topic.regex` as given (Java's `find()`, for `replaceFirst`).
    first: Regex,
    replacement: Vec<Piece>,
    headers: Vec<(super::HeaderName, Column)>,
    tombstones: bool,
    json: bool,
}

/// A piece of a Java replacement string.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Group(usize),
    Named(String),
}

/// Parses `replacement` as `java.util.regex.Matcher.appendReplacement`
/// does: `\x` is a literal x, `${name}` a named group, `$n` a numbered
/// group (digits taken while the number stays a group of `re`).
fn parse_replacement(replacement: &str, re: &Regex) -> Result<Vec<Piece>, String> {
    let groups = re.captures_len() - 1;
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => text.push(chars.next().ok_or("a trailing '\\' escapes nothing")?),
            '$' => {
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                if chars.peek() == Some(&'{') {
                    chars.next();
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    if re.capture_names().flatten().all(|n| n != name) {
                        return Err(format!("no group named {name:?} in route.topic.regex"));
                    }
                    pieces.push(Piece::Named(name));
                    continue;
                }
                let first =
                    chars.next().and_then(|d| d.to_digit(10)).ok_or(
                        "'$' must be followed by a group number or {name} (escape it as \\$)",
                    )? as usize;
                if first > groups {
                    return Err(format!("no group {first} in route.topic.regex"));
                }
                let mut n = first;
                while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                    let next = n * 10 + d as usize;
                    if next > groups {
                        break;
                    }
                    n = next;
                    chars.next();
                }
                pieces.push(Piece::Group(n));
            }
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

impl EventRouter {
    /// Resolves `cfg` against the outbox table's columns.
    pub(super) fn new(cfg: &EventRouterConfig) -> Result<EventRouter, ConfigError> {
        let regex_error = |e: String| ConfigError::new("kafka.debezium.route.topic.regex", e);
        let first = Regex::new(&cfg.route_topic_regex).map_err(|e| regex_error(e.to_string()))?;
        let whole = Regex::new(&format!("^(?:{})$", cfg.route_topic_regex))
            .map_err(|e| regex_error(e.to_string()))?;
        let replacement = parse_replacement(&cfg.route_topic_replacement, &first)
            .map_err(|e| ConfigError::new("kafka.debezium.route.topic.replacement", e))?;
        if cfg.field_event_timestamp.is_some() {
            return Err(ConfigError::new(
                "kafka.debezium.table.field.event.timestamp",
                "is not supported yet: records carry the time they are produced, as Debezium's do without it",
            ));
        }
        if cfg.expand_json_payload {
            return Err(ConfigError::new(
                "kafka.debezium.table.expand.json.payload",
                "is not supported: Kafka Connect re-serialises the expanded JSON in a way that cannot be reproduced byte for byte; leave it false (consumers get the payload's JSON text)",
            ));
        }
        let headers = cfg
            .placements()?
            .into_iter()
            .map(|(column, alias)| {
                let c = Column::named("table.fields.additional.placement", &column)?;
                Ok((super::HeaderName::Owned(alias), c))
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(EventRouter {
            id: Column::named("table.field.event.id", &cfg.field_event_id)?,
            key: Column::named("table.field.event.key", &cfg.field_event_key)?,
            payload: Column::named("table.field.event.payload", &cfg.field_event_payload)?,
            route_by: Column::named("route.by.field", &cfg.route_by_field)?,
            whole,
            first,
            replacement,
            headers,
            tombstones: cfg.tombstone_on_empty_payload,
            json: cfg.converter == DebeziumConverter::Json,
        })
    }

    /// The topic for a routing value, as `RegexRouter` makes it.
    pub(super) fn topic(&self, value: &str) -> String {
        if !self.whole.is_match(value) {
            return value.to_owned();
        }
        let Some(caps) = self.first.captures(value) else {
            return value.to_owned();
        };
        let whole = caps.get(0).expect("group 0");
        let mut out = String::with_capacity(value.len() + 16);
        out.push_str(&value[..whole.start()]);
        for piece in &self.replacement {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Group(n) => out.push_str(caps.get(*n).map_or("", |m| m.as_str())),
                Piece::Named(n) => out.push_str(caps.name(n).map_or("", |m| m.as_str())),
            }
        }
        out.push_str(&value[whole.end()..]);
        out
    }

    /// The topic for `event`: its `route.by.field` value, routed.
    pub(super) fn topic_for(&self, event: &OutboxEvent) -> Result<String, TopicError> {
        let routed = self.route_by.of(event).cloned().unwrap_or_default();
        let routed = std::str::from_utf8(&routed).map_err(|_| TopicError::Name {
            name: String::from_utf8_lossy(&routed).into_owned(),
            why: "is not UTF-8",
        })?;
        super::check_topic(self.topic(routed))
    }

    /// The record for `event`.
    pub(super) fn build(&self, event: &OutboxEvent) -> Result<KafkaRecord, RecordError> {
        let text = |c: Column| c.of(event).cloned().unwrap_or_default();
        let topic = self.topic_for(event)?;
        let payload = self.payload.of(event);
        let empty = payload.is_none_or(|p| p.iter().all(u8::is_ascii_whitespace));
        let value = match payload {
            _ if empty && self.tombstones => None,
            None if self.json => Some(Bytes::from_static(b"null")),
            None => None,
            Some(p) if self.json => Some(json_string(p)),
            Some(p) => Some(p.clone()),
        };
        let key = if self.json {
            json_string(&text(self.key))
        } else {
            text(self.key)
        };
        let mut headers = Vec::with_capacity(1 + self.headers.len());
        headers.push((super::HeaderName::Borrowed("id"), text(self.id)));
        for (alias, column) in &self.headers {
            headers.push((alias.clone(), text(*column)));
        }
        Ok(KafkaRecord {
            topic,
            key,
            tombstone: value.is_none(),
            value: value.unwrap_or_default(),
            headers,
        })
    }
}

/// `text` as a JSON string literal, escaped as Kafka Connect's JSON
/// converter (Jackson) escapes: `\"`, `\\`, the short forms of `\b \t \n
/// \f \r`, other control characters as `\u00XX` (upper-case hex), the rest
/// as UTF-8.
fn json_string(text: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(text.len() + 2);
    out.push(b'"');
    for &b in text {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04X}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::sample_event;

    fn router(options: &str) -> EventRouter {
        let cfg: EventRouterConfig = toml::from_str(options).expect("options");
        EventRouter::new(&cfg).expect("router")
    }

    const PGOUTBOX_TABLE: &str = r#"
        "table.field.event.id" = "tracking_id"
        "table.field.event.key" = "aggregate_id"
        "route.by.field" = "aggregate_type"
    "#;

    #[test]
    fn the_default_route_prefixes_the_routing_value() {
        let r = router(PGOUTBOX_TABLE);
        assert_eq!(r.topic("Order"), "outbox.event.Order");
        let rec = r.build(&sample_event()).unwrap();
        assert_eq!(rec.topic, "outbox.event.Order");
        assert_eq!(rec.key, sample_event().aggregate_id);
        assert_eq!(
            rec.value,
            sample_event().payload,
            "string converter: the payload as is"
        );
        assert_eq!(rec.headers, [("id".into(), sample_event().tracking_id)]);
        assert!(!rec.tombstone);
    }

    #[test]
    fn routing_follows_java_regex_router_semantics() {
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"route.topic.regex\" = \"(?<kind>[a-z]+)_(\\\\d+)\"\n\"route.topic.replacement\" = \"t.${{kind}}.$2\\\\$\""
        ));
        assert_eq!(r.topic("order_12"), "t.order.12$");
        assert_eq!(
            r.topic("Order_12"),
            "Order_12",
            "no whole match: the value itself"
        );
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"route.topic.regex\" = \"(a)(b)\"\n\"route.topic.replacement\" = \"$12\""
        ));
        assert_eq!(
            r.topic("ab"),
            "a2",
            "$12 is group 1 then '2' when there is no group 12"
        );
        for (regex, replacement) in [
            ("(a)", "$2"),
            ("(a)", "${nope}"),
            ("(a)", "x$"),
            ("(a", "x"),
        ] {
            let cfg = EventRouterConfig {
                route_topic_regex: regex.into(),
                route_topic_replacement: replacement.into(),
                ..toml::from_str(PGOUTBOX_TABLE).unwrap()
            };
            assert!(EventRouter::new(&cfg).is_err(), "{regex} / {replacement}");
        }
    }

    #[test]
    fn the_json_converter_writes_key_and_payload_as_json_strings() {
        let r = router(&format!("{PGOUTBOX_TABLE}\nconverter = \"json\""));
        let mut e = sample_event();
        e.payload = Bytes::from_static(b"{\"a\": \"x\\ny\"}\t\x01");
        let rec = r.build(&e).unwrap();
        assert_eq!(
            rec.key,
            Bytes::from_static(b"\"8f14e45f-ceea-467f-a0e6-1c7a5f9d2b11\"")
        );
        assert_eq!(
            rec.value,
            Bytes::from_static(b"\"{\\\"a\\\": \\\"x\\\\ny\\\"}\\t\\u0001\"")
        );
    }

    #[test]
    fn empty_payloads_are_tombstones_only_when_asked() {
        let mut e = sample_event();
        e.payload = Bytes::from_static(b"  ");
        let kept = router(PGOUTBOX_TABLE).build(&e).unwrap();
        assert!(!kept.tombstone);
        assert_eq!(kept.value, Bytes::from_static(b"  "));
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"route.tombstone.on.empty.payload\" = true"
        ));
        let rec = r.build(&e).unwrap();
        assert!(rec.tombstone);
        assert!(rec.value.is_empty());
        assert_eq!(rec.key, e.aggregate_id, "a tombstone keeps its key");
    }

    #[test]
    fn additional_fields_become_headers_under_their_alias() {
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"table.fields.additional.placement\" = \"event_type:header:eventType,created_at:header\""
        ));
        let rec = r.build(&sample_event()).unwrap();
        let names: Vec<&str> = rec.headers.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(names, ["id", "eventType", "created_at"]);
        assert_eq!(rec.headers[1].1, Bytes::from_static(b"OrderCreated"));
    }

    #[test]
    fn options_pgoutbox_cannot_honour_are_refused_not_ignored() {
        for extra in [
            "\"table.expand.json.payload\" = true",
            "\"table.field.event.timestamp\" = \"created_at\"",
            "\"table.fields.additional.placement\" = \"event_type:partition\"",
        ] {
            let cfg: EventRouterConfig =
                toml::from_str(&format!("{PGOUTBOX_TABLE}\n{extra}")).unwrap();
            assert!(EventRouter::new(&cfg).is_err(), "{extra}");
        }
    }

    #[test]
    fn options_naming_missing_columns_are_refused_with_the_columns_there_are() {
        let e = EventRouter::new(&EventRouterConfig::default()).unwrap_err();
        assert_eq!(e.field, "kafka.debezium.table.field.event.key");
        assert!(e.problem.contains("\"aggregateid\" is not a column"), "{e}");
        assert!(e.problem.contains("aggregate_id"), "{e}");
    }
}

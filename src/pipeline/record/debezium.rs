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

use super::connect::{epoch_micros, json_string, Kind};
use super::expand::{expand, Expanded};
use super::{KafkaRecord, RecordError};
use crate::config::{
    ColumnMap, ConfigError, DebeziumConverter, EventRouterConfig, Place, Role, TopicError,
};
use crate::outbox::OutboxEvent;

/// A column of the outbox table, as the router's options name it: one of
/// the table's roles (`[outbox.columns]`) or an additional column the
/// events carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Column {
    Role(Role),
    Additional(usize),
}

impl Column {
    /// The column `name`, resolved through `map` (which
    /// [`crate::config::Config::event_columns`] made read every column the
    /// router names).
    fn named(option: &str, name: &str, map: &ColumnMap) -> Result<Column, ConfigError> {
        if let Some(role) = map.role_of(name) {
            return Ok(Column::Role(role));
        }
        map.additional_index(name)
            .map(Column::Additional)
            .ok_or_else(|| {
                ConfigError::new(
                    format!("kafka.debezium.{option}"),
                    format!(
                        "{name:?} is neither a column of [outbox.columns] nor one of its additional columns"
                    ),
                )
            })
    }

    /// The column's text in `event` (`None` for NULL or an absent role).
    fn of(self, event: &OutboxEvent) -> Option<&Bytes> {
        let role = match self {
            Column::Additional(i) => return event.additional.get(i)?.as_ref(),
            Column::Role(r) => r,
        };
        let text = match role {
            Role::EventId => &event.tracking_id,
            Role::AggregateType => &event.aggregate_type,
            Role::AggregateId => &event.aggregate_id,
            Role::EventType => &event.event_type,
            Role::Payload if event.payload_null => return None,
            Role::Payload => &event.payload,
            Role::Timestamp => &event.created_at,
            Role::TraceContext => return event.metadata.as_ref(),
        };
        Some(text)
    }
}

/// The router's options, resolved against the outbox table's columns.
#[derive(Clone, Debug)]
pub(super) struct EventRouter {
    id: Placed,
    key: Placed,
    payload: Column,
    route_by: Column,
    /// `route.topic.regex`, anchored at both ends (Java's `matches()`).
    whole: Regex,
    /// `route.topic.regex` as given (Java's `find()`, for `replaceFirst`).
    first: Regex,
    replacement: Vec<Piece>,
    /// `route.regex` → `route.topic.replacement` as configured, for logs.
    routing: String,
    headers: Vec<(super::HeaderName, Placed)>,
    /// `envelope` placements: the value becomes a struct of the payload
    /// and these fields.
    envelope: Vec<(String, Placed)>,
    /// The last `partition` placement (Debezium keeps the last one).
    partition: Option<Column>,
    /// `table.field.event.timestamp`.
    timestamp: Option<Placed>,
    tombstones: bool,
    json: bool,
    /// `table.expand.json.payload` (see [`super::expand`]).
    expand: bool,
}

/// A column and how Connect renders it ([`Kind::Text`] until
/// [`EventRouter::fit_types`] learns the table's types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placed {
    column: Column,
    kind: Kind,
}

impl std::fmt::Display for EventRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.routing)
    }
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
    /// Resolves `cfg` against the outbox table's columns (`map`).
    pub(super) fn new(
        cfg: &EventRouterConfig,
        map: &ColumnMap,
    ) -> Result<EventRouter, ConfigError> {
        let regex_error = |e: String| ConfigError::new("kafka.debezium.route.topic.regex", e);
        let first = Regex::new(&cfg.route_topic_regex).map_err(|e| regex_error(e.to_string()))?;
        let whole = Regex::new(&format!("^(?:{})$", cfg.route_topic_regex))
            .map_err(|e| regex_error(e.to_string()))?;
        let replacement = parse_replacement(&cfg.route_topic_replacement, &first)
            .map_err(|e| ConfigError::new("kafka.debezium.route.topic.replacement", e))?;
        let placed = |option: &str, name: &str| -> Result<Placed, ConfigError> {
            Ok(Placed {
                column: Column::named(option, name, map)?,
                kind: Kind::Text,
            })
        };
        let option = "table.fields.additional.placement";
        let (mut headers, mut envelope, mut partition) = (Vec::new(), Vec::new(), None);
        for p in cfg.placements()? {
            let at = placed(option, &p.column)?;
            match p.place {
                Place::Header => headers.push((super::HeaderName::Owned(p.alias), at)),
                Place::Envelope => envelope.push((p.alias, at)),
                Place::Partition => partition = Some(at.column),
            }
        }
        let timestamp = match &cfg.field_event_timestamp {
            Some(c) => Some(placed("table.field.event.timestamp", c)?),
            None => None,
        };
        Ok(EventRouter {
            id: placed("table.field.event.id", &cfg.field_event_id)?,
            key: placed("table.field.event.key", &cfg.field_event_key)?,
            payload: Column::named("table.field.event.payload", &cfg.field_event_payload, map)?,
            route_by: Column::named("route.by.field", &cfg.route_by_field, map)?,
            whole,
            first,
            replacement,
            routing: format!(
                "{} routed by {:?} → {:?}",
                cfg.route_by_field, cfg.route_topic_regex, cfg.route_topic_replacement
            ),
            headers,
            envelope,
            partition,
            timestamp,
            tombstones: cfg.tombstone_on_empty_payload,
            json: cfg.converter == DebeziumConverter::Json,
            expand: cfg.expand_json_payload,
        })
    }

    /// Learns how Connect renders each placed column from the table's
    /// column types (`type_of(column)`, `format_type` spelling), refusing
    /// a type whose rendering pgoutbox does not reproduce where it shows:
    /// the key with the JSON converter, headers, envelope fields, the
    /// partition (Debezium takes it as an `integer`) and the timestamp (a
    /// `timestamp` or `timestamptz` column).
    pub(super) fn fit_types(
        &mut self,
        map: &ColumnMap,
        type_of: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let name = |c: Column| match c {
            Column::Role(r) => map.name(r).unwrap_or_default().to_string(),
            Column::Additional(i) => map.additional().get(i).cloned().unwrap_or_default(),
        };
        let fit = |option: &str, p: &mut Placed| -> Result<(), ConfigError> {
            let column = name(p.column);
            let Some(sql_type) = type_of(&column) else {
                return Ok(());
            };
            p.kind = Kind::of(&sql_type).ok_or_else(|| {
                ConfigError::new(
                    format!("kafka.debezium.{option}"),
                    format!(
                        "column {column:?} is {sql_type}, whose Debezium rendering pgoutbox does not reproduce (text, varchar, uuid, json(b), integers, boolean, timestamp(tz) are); place another column"
                    ),
                )
            })?;
            Ok(())
        };
        fit("table.field.event.id", &mut self.id)?;
        fit("table.field.event.key", &mut self.key)?;
        let placement = "table.fields.additional.placement";
        for (_, p) in &mut self.headers {
            fit(placement, p)?;
        }
        for (_, p) in &mut self.envelope {
            fit(placement, p)?;
        }
        if let Some(c) = self.partition {
            let column = name(c);
            match type_of(&column) {
                Some(t) if t != "integer" => {
                    return Err(ConfigError::new(
                        format!("kafka.debezium.{placement}"),
                        format!("partition placement takes an integer column (as Debezium does); {column:?} is {t}"),
                    ))
                }
                _ => {}
            }
        }
        if let Some(p) = &mut self.timestamp {
            fit("table.field.event.timestamp", p)?;
            if !matches!(p.kind, Kind::Zoned | Kind::Micros) {
                return Err(ConfigError::new(
                    "kafka.debezium.table.field.event.timestamp",
                    format!(
                        "column {:?} is not a timestamp or timestamptz",
                        name(p.column)
                    ),
                ));
            }
        }
        Ok(())
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

    /// The value with `envelope` placements: Connect's `Struct` of the
    /// payload (field `payload`) and the placed columns, as the converter
    /// writes it — `Struct{payload=…,alias=…}` (NULL fields left out) with
    /// the string converter, a JSON object (NULL fields as `null`) with
    /// the JSON converter.
    fn envelope_value(
        &self,
        event: &OutboxEvent,
        payload: Option<&Bytes>,
        expanded: Option<&Bytes>,
    ) -> Bytes {
        let fields = std::iter::once(("payload", Kind::Text, payload)).chain(
            self.envelope
                .iter()
                .map(|(alias, p)| (alias.as_str(), p.kind, p.column.of(event))),
        );
        let mut out = Vec::new();
        if self.json {
            out.push(b'{');
            for (i, (name, kind, value)) in fields.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(&json_string(name.as_bytes()));
                out.push(b':');
                match expanded {
                    Some(printed) if i == 0 => out.extend_from_slice(printed),
                    _ => out.extend_from_slice(&kind.json(value.map(|v| &v[..]))),
                }
            }
            out.push(b'}');
        } else {
            out.extend_from_slice(b"Struct{");
            let present =
                fields
                    .enumerate()
                    .filter_map(|(i, (name, kind, value))| match expanded {
                        Some(printed) if i == 0 => Some((name, printed.clone())),
                        _ => Some((name, kind.text(value?))),
                    });
            for (i, (name, text)) in present.enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
                out.extend_from_slice(&text);
            }
            out.push(b'}');
        }
        Bytes::from(out)
    }

    /// The record for `event`, on its routed topic.
    #[cfg(test)]
    pub(super) fn build(&self, event: &OutboxEvent) -> Result<KafkaRecord, RecordError> {
        self.build_on(event, self.topic_for(event)?)
    }

    /// The record for `event`, on `topic` (its routed topic, unless every
    /// record goes to one topic: [`super::RecordBuilder::route_all_to`]).
    pub(super) fn build_on(
        &self,
        event: &OutboxEvent,
        topic: String,
    ) -> Result<KafkaRecord, RecordError> {
        let payload = self.payload.of(event);
        let empty = payload.is_none_or(|p| p.iter().all(u8::is_ascii_whitespace));
        let expanded = match payload {
            Some(p) if self.expand => match expand(p, self.json, !self.envelope.is_empty()) {
                Expanded::Value(v) => Some(Bytes::from(v)),
                Expanded::Unchanged => None,
                Expanded::Refused(why) => return Err(RecordError::Payload(why)),
            },
            _ => None,
        };
        let value = match payload {
            _ if empty && self.tombstones => None,
            _ if !self.envelope.is_empty() => {
                Some(self.envelope_value(event, payload, expanded.as_ref()))
            }
            _ if expanded.is_some() => expanded.clone(),
            None if self.json => Some(Bytes::from_static(b"null")),
            None => None,
            Some(p) if self.json => Some(json_string(p)),
            Some(p) => Some(p.clone()),
        };
        let key_text = self.key.column.of(event).cloned().unwrap_or_default();
        let key = if self.json {
            self.key.kind.json(Some(&key_text))
        } else {
            self.key.kind.text(&key_text)
        };
        // A NULL column is a header with a null value, as Connect sends it.
        let rendered = |p: &Placed| p.column.of(event).map(|v| p.kind.text(v));
        let mut headers = Vec::with_capacity(1 + self.headers.len());
        headers.push((super::HeaderName::Borrowed("id"), rendered(&self.id)));
        for (alias, placed) in &self.headers {
            headers.push((alias.clone(), rendered(placed)));
        }
        let partition = match self.partition.and_then(|c| c.of(event)) {
            None => None,
            Some(v) => Some(
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|t| t.parse::<i32>().ok())
                    .ok_or_else(|| {
                        RecordError::Payload(format!(
                            "the partition column's value {:?} is not an integer",
                            String::from_utf8_lossy(v)
                        ))
                    })?,
            ),
        };
        let timestamp = self
            .timestamp
            .as_ref()
            .and_then(|p| p.column.of(event))
            .and_then(|v| epoch_micros(v))
            .map(|us| us / 1000);
        let trace = event.trace_context();
        if let Some(tp) = trace.traceparent {
            headers.push((
                super::HeaderName::Borrowed(super::header::TRACEPARENT),
                Some(Bytes::from(tp)),
            ));
        }
        if let Some(ts) = trace.tracestate {
            headers.push((
                super::HeaderName::Borrowed(super::header::TRACESTATE),
                Some(Bytes::from(ts)),
            ));
        }
        Ok(KafkaRecord {
            topic,
            key,
            tombstone: value.is_none(),
            value: value.unwrap_or_default(),
            headers,
            partition,
            timestamp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::sample_event;

    fn router(options: &str) -> EventRouter {
        let cfg: EventRouterConfig = toml::from_str(options).expect("options");
        EventRouter::new(&cfg, &ColumnMap::pgoutbox()).expect("router")
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
        assert_eq!(
            rec.headers,
            [
                ("id".into(), Some(sample_event().tracking_id)),
                (
                    "traceparent".into(),
                    Some(Bytes::from_static(b"00-abc-def-01"))
                )
            ],
            "the trace context column is propagated as W3C trace context"
        );
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
            assert!(
                EventRouter::new(&cfg, &ColumnMap::pgoutbox()).is_err(),
                "{regex} / {replacement}"
            );
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
        assert_eq!(names, ["id", "eventType", "created_at", "traceparent"]);
        assert_eq!(rec.headers[1].1, Some(Bytes::from_static(b"OrderCreated")));
    }

    #[test]
    fn an_expanded_payload_is_the_value_and_the_envelopes_payload() {
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"table.expand.json.payload\" = true\nconverter = \"json\""
        ));
        assert_eq!(
            r.build(&sample_event()).unwrap().value,
            Bytes::from_static(b"{\"total\":10}")
        );
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"table.expand.json.payload\" = true\n\"table.fields.additional.placement\" = \"event_type:envelope:type\""
        ));
        assert_eq!(
            r.build(&sample_event()).unwrap().value,
            Bytes::from_static(b"Struct{payload=Struct{total=10},type=OrderCreated}")
        );
        let mut e = sample_event();
        e.payload = Bytes::from_static(b"[1, 2]");
        let r = router(&format!(
            "{PGOUTBOX_TABLE}\n\"table.expand.json.payload\" = true\nconverter = \"json\""
        ));
        assert!(
            matches!(r.build(&e), Err(RecordError::Payload(_))),
            "what stops Debezium's task is dead-lettered"
        );
    }

    #[test]
    fn options_pgoutbox_cannot_honour_are_refused_not_ignored() {
        let types = |c: &str| {
            Some(match c {
                "event_type" => "numeric(10,2)".to_string(),
                "created_at" => "timestamp with time zone".to_string(),
                _ => "text".to_string(),
            })
        };
        for (extra, field) in [
            (
                "\"table.fields.additional.placement\" = \"event_type:header\"",
                "placement",
            ),
            (
                "\"table.fields.additional.placement\" = \"event_type:partition\"",
                "placement",
            ),
            ("\"table.field.event.timestamp\" = \"payload\"", "timestamp"),
        ] {
            let cfg: EventRouterConfig =
                toml::from_str(&format!("{PGOUTBOX_TABLE}\n{extra}")).unwrap();
            let mut r = EventRouter::new(&cfg, &ColumnMap::pgoutbox()).unwrap();
            let e = r.fit_types(&ColumnMap::pgoutbox(), &types).unwrap_err();
            assert!(e.field.contains(field), "{extra}: {e}");
        }
    }

    /// A router on pgoutbox's table whose columns have these types.
    fn typed(options: &str, types: &[(&str, &str)]) -> EventRouter {
        let mut r = router(options);
        let types: Vec<(String, String)> = types
            .iter()
            .map(|(c, t)| (c.to_string(), t.to_string()))
            .collect();
        r.fit_types(&ColumnMap::pgoutbox(), &|c| {
            types.iter().find(|(n, _)| n == c).map(|(_, t)| t.clone())
        })
        .unwrap();
        r
    }

    #[test]
    fn envelope_placements_make_a_struct_as_each_converter_writes_it() {
        let options = format!(
            "{PGOUTBOX_TABLE}\n\"table.fields.additional.placement\" = \"event_type:envelope:type,created_at:envelope:at,metadata:envelope\""
        );
        let types = [
            ("created_at", "timestamp with time zone"),
            ("metadata", "jsonb"),
        ];
        let mut e = sample_event();
        e.metadata = None;
        let r = typed(&options, &types);
        assert_eq!(
            r.build(&e).unwrap().value,
            Bytes::from_static(
                b"Struct{payload={\"total\": 10},type=OrderCreated,at=2026-11-27T10:00:00.123456Z}"
            ),
            "Struct.toString leaves NULL fields out"
        );
        let r = typed(&format!("{options}\nconverter = \"json\""), &types);
        assert_eq!(
            r.build(&e).unwrap().value,
            Bytes::from_static(
                b"{\"payload\":\"{\\\"total\\\": 10}\",\"type\":\"OrderCreated\",\"at\":\"2026-11-27T10:00:00.123456Z\",\"metadata\":null}"
            )
        );
    }

    #[test]
    fn partition_timestamp_and_typed_headers_follow_the_columns() {
        let mut e = sample_event();
        e.additional = vec![
            Some(Bytes::from_static(b"3")),
            Some(Bytes::from_static(b"t")),
        ];
        let map = crate::config::ColumnsConfig {
            additional: vec!["shard".into(), "urgent".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let cfg: EventRouterConfig = toml::from_str(&format!(
            "{PGOUTBOX_TABLE}\n\"table.fields.additional.placement\" = \"shard:partition,urgent:header\"\n\"table.field.event.timestamp\" = \"created_at\""
        ))
        .unwrap();
        let mut r = EventRouter::new(&cfg, &map).unwrap();
        r.fit_types(&map, &|c| {
            Some(
                match c {
                    "shard" => "integer",
                    "urgent" => "boolean",
                    "created_at" => "timestamp with time zone",
                    _ => "uuid",
                }
                .to_string(),
            )
        })
        .unwrap();
        let rec = r.build(&e).unwrap();
        assert_eq!(rec.partition, Some(3));
        assert_eq!(rec.timestamp, Some(1_795_773_600_123));
        assert_eq!(
            rec.headers[1],
            ("urgent".into(), Some(Bytes::from_static(b"true")))
        );
        e.additional[0] = Some(Bytes::from_static(b"x"));
        assert!(
            matches!(r.build(&e), Err(RecordError::Payload(_))),
            "dead-lettered, not dropped"
        );
    }

    #[test]
    fn options_naming_columns_no_event_carries_are_refused() {
        let e =
            EventRouter::new(&EventRouterConfig::default(), &ColumnMap::pgoutbox()).unwrap_err();
        assert_eq!(e.field, "kafka.debezium.table.field.event.id");
        assert!(e.problem.contains("\"id\" is neither a column"), "{e}");
    }

    #[test]
    fn debeziums_table_needs_no_options_and_extra_columns_come_from_the_map() {
        let map = crate::config::ColumnsConfig {
            preset: crate::config::TablePreset::Debezium,
            additional: vec!["tenant".into()],
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let cfg: EventRouterConfig = toml::from_str(
            "\"table.fields.additional.placement\" = \"tenant:header:Tenant,type:header\"",
        )
        .unwrap();
        let r = EventRouter::new(&cfg, &map).unwrap();
        let mut e = sample_event();
        e.additional = vec![Some(Bytes::from_static(b"acme"))];
        e.metadata = Some(Bytes::from_static(b"traceparent=00-abc-def-01\n"));
        let rec = r.build(&e).unwrap();
        assert_eq!(rec.topic, "outbox.event.Order");
        assert_eq!(rec.key, e.aggregate_id);
        let headers: Vec<(&str, Option<&[u8]>)> = rec
            .headers
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_deref()))
            .collect();
        assert_eq!(
            headers,
            [
                ("id", Some(&e.tracking_id[..])),
                ("Tenant", Some(&b"acme"[..])),
                ("type", Some(&b"OrderCreated"[..])),
                ("traceparent", Some(&b"00-abc-def-01"[..])),
            ]
        );
        e.additional = vec![None];
        e.payload_null = true;
        let rec = r.build(&e).unwrap();
        assert_eq!(
            rec.headers[1],
            ("Tenant".into(), None),
            "NULL: a null header"
        );
        assert!(rec.tombstone, "NULL payload: a record without a value");
    }
}

//! `kafka.format` and its options: how an outbox event becomes a Kafka
//! record.
//!
//! - `pgoutbox` (the default): topic from `kafka.topic`, key = aggregate id,
//!   value = payload, headers `tracking_id`, `aggregate_type`,
//!   `aggregate_id`, `event_type`, `created_at`, the trace context and the
//!   top-level keys of `metadata` ([`MetadataHeaders`]).
//! - `debezium`: what Debezium's Outbox Event Router produces, configured
//!   under `[kafka.debezium]` with the router's own option names.
//! - `cloudevents`: the CloudEvents Kafka protocol binding, binary or
//!   structured mode, under `[kafka.cloudevents]`.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::ConfigError;

/// Which top-level keys of an event's `metadata` object become Kafka
/// headers in pgoutbox's record format (`kafka.metadata_headers`, env
/// `OUTBOX_METADATA_HEADERS`): `"all"` (the default), `"none"`, or a list
/// of keys. A string value is sent as the string, any other as its JSON
/// text; keys that name pgoutbox's own headers are never sent twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MetadataHeaders {
    /// Every top-level key.
    #[default]
    All,
    /// None.
    None,
    /// These keys only.
    Only(Vec<String>),
}

impl MetadataHeaders {
    /// Whether `key` is sent.
    pub fn includes(&self, key: &str) -> bool {
        match self {
            MetadataHeaders::All => true,
            MetadataHeaders::None => false,
            MetadataHeaders::Only(keys) => keys.iter().any(|k| k == key),
        }
    }
}

impl FromStr for MetadataHeaders {
    type Err = String;

    /// `all`, `none`, or keys separated by commas (the env form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => Ok(MetadataHeaders::All),
            "none" | "" => Ok(MetadataHeaders::None),
            list => Ok(MetadataHeaders::Only(
                list.split(',')
                    .map(|k| k.trim().to_owned())
                    .filter(|k| !k.is_empty())
                    .collect(),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for MetadataHeaders {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Keys(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(MetadataHeaders::All),
            Raw::Word(w) if w == "none" => Ok(MetadataHeaders::None),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "{w:?} is not a choice: use \"all\", \"none\" or a list of metadata keys"
            ))),
            Raw::Keys(keys) => Ok(MetadataHeaders::Only(keys)),
        }
    }
}

/// How records are laid out (`kafka.format`, env `OUTBOX_RECORD_FORMAT`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RecordFormat {
    /// pgoutbox's own layout.
    #[default]
    Pgoutbox,
    /// Debezium's Outbox Event Router.
    Debezium,
    /// CloudEvents over Kafka.
    Cloudevents,
}

impl RecordFormat {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordFormat::Pgoutbox => "pgoutbox",
            RecordFormat::Debezium => "debezium",
            RecordFormat::Cloudevents => "cloudevents",
        }
    }
}

impl fmt::Display for RecordFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RecordFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pgoutbox" => Ok(RecordFormat::Pgoutbox),
            "debezium" => Ok(RecordFormat::Debezium),
            "cloudevents" => Ok(RecordFormat::Cloudevents),
            other => Err(format!(
                "{other:?} is not a record format: use \"pgoutbox\", \"debezium\" or \"cloudevents\""
            )),
        }
    }
}

/// `[kafka.debezium]`: the Outbox Event Router's options, under the names
/// Debezium gives them (`transforms.<name>.<option>` without the prefix).
/// Field options name columns of the outbox table (see
/// `crate::pipeline::record` for how names resolve).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EventRouterConfig {
    /// `table.field.event.id`: the column sent as the `id` header.
    #[serde(rename = "table.field.event.id")]
    pub field_event_id: String,
    /// `table.field.event.key`: the column that becomes the record key.
    #[serde(rename = "table.field.event.key")]
    pub field_event_key: String,
    /// `table.field.event.type`: the event type column (only used by
    /// `table.fields.additional.placement` and CloudEvents-free setups).
    #[serde(rename = "table.field.event.type")]
    pub field_event_type: String,
    /// `table.field.event.payload`: the column that becomes the value.
    #[serde(rename = "table.field.event.payload")]
    pub field_event_payload: String,
    /// `table.field.event.timestamp`: the column whose time becomes the
    /// record's timestamp; unset, the commit time is left to the producer.
    #[serde(rename = "table.field.event.timestamp")]
    pub field_event_timestamp: Option<String>,
    /// `table.fields.additional.placement`: `column:header[:alias],…`
    /// (only `header` placement is supported).
    #[serde(rename = "table.fields.additional.placement")]
    pub additional_placement: Option<String>,
    /// `route.by.field`: the column whose value routes the record.
    #[serde(rename = "route.by.field")]
    pub route_by_field: String,
    /// `route.topic.regex`: matched against the routing value; the named
    /// group `routedByValue` is what the replacement may use.
    #[serde(rename = "route.topic.regex")]
    pub route_topic_regex: String,
    /// `route.topic.replacement`: the topic, with `${routedByValue}`.
    #[serde(rename = "route.topic.replacement")]
    pub route_topic_replacement: String,
    /// `route.tombstone.on.empty.payload`: an empty payload is sent as a
    /// tombstone (no value).
    #[serde(rename = "route.tombstone.on.empty.payload")]
    pub tombstone_on_empty_payload: bool,
    /// `table.expand.json.payload`: the payload is JSON to expand (the
    /// value is the same JSON text either way with the JSON or string
    /// converter; accepted for compatibility).
    #[serde(rename = "table.expand.json.payload")]
    pub expand_json_payload: bool,
    /// `tracing.span.context.field`: the column holding the trace context.
    #[serde(rename = "tracing.span.context.field")]
    pub tracing_span_context_field: String,
    /// The Kafka Connect converter the records are to match: `string`
    /// (`StringConverter`, the default) or `json` (`JsonConverter` with
    /// `schemas.enable=false`). Not a router option: Connect's
    /// `key.converter` / `value.converter`.
    pub converter: DebeziumConverter,
}

/// The Kafka Connect converter whose bytes the `debezium` format matches.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DebeziumConverter {
    /// `org.apache.kafka.connect.storage.StringConverter`.
    #[default]
    String,
    /// `org.apache.kafka.connect.json.JsonConverter`, `schemas.enable=false`.
    Json,
}

impl Default for EventRouterConfig {
    fn default() -> Self {
        EventRouterConfig {
            field_event_id: "id".into(),
            field_event_key: "aggregateid".into(),
            field_event_type: "type".into(),
            field_event_payload: "payload".into(),
            field_event_timestamp: None,
            additional_placement: None,
            route_by_field: "aggregatetype".into(),
            route_topic_regex: "(?<routedByValue>.*)".into(),
            route_topic_replacement: "outbox.event.${routedByValue}".into(),
            tombstone_on_empty_payload: false,
            expand_json_payload: false,
            tracing_span_context_field: "tracingspancontext".into(),
            converter: DebeziumConverter::String,
        }
    }
}

/// CloudEvents' two Kafka encodings.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CloudEventsMode {
    /// Attributes in `ce_*` headers, the payload as the value.
    #[default]
    Binary,
    /// The whole event as one JSON object in the value.
    Structured,
}

/// `[kafka.cloudevents]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudEventsConfig {
    /// Binary or structured mode.
    pub mode: CloudEventsMode,
    /// The `source` attribute (a URI reference); `{table}` is replaced by
    /// the event's table.
    pub source: String,
}

impl Default for CloudEventsConfig {
    fn default() -> Self {
        CloudEventsConfig {
            mode: CloudEventsMode::Binary,
            source: "/pgoutbox/{table}".into(),
        }
    }
}

impl CloudEventsConfig {
    /// Checks the source.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.source.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.cloudevents.source",
                "must not be empty (a URI reference such as /pgoutbox/{table})",
            ));
        }
        Ok(())
    }
}

impl EventRouterConfig {
    /// Checks what can be checked without the table: a placement list that
    /// parses, and a replacement that only names the regex's groups.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("table.field.event.id", &self.field_event_id),
            ("table.field.event.key", &self.field_event_key),
            ("table.field.event.payload", &self.field_event_payload),
            ("route.by.field", &self.route_by_field),
        ] {
            if value.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("kafka.debezium.{field}"),
                    "must name a column",
                ));
            }
        }
        self.placements()?;
        Ok(())
    }

    /// `table.fields.additional.placement` as placements, in order.
    pub fn placements(&self) -> Result<Vec<Placement>, ConfigError> {
        let field = "kafka.debezium.table.fields.additional.placement";
        let Some(list) = &self.additional_placement else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|item| {
                let parts: Vec<&str> = item.split(':').map(str::trim).collect();
                let (column, place, alias) = match parts.as_slice() {
                    [column, place] => (*column, *place, *column),
                    [column, place, alias] => (*column, *place, *alias),
                    _ => {
                        return Err(ConfigError::new(
                            field,
                            format!("{item:?} is not column:placement[:alias]"),
                        ))
                    }
                };
                let place = match place {
                    "header" => Place::Header,
                    "envelope" => Place::Envelope,
                    "partition" => Place::Partition,
                    other => {
                        return Err(ConfigError::new(
                            field,
                            format!(
                                "{item:?}: placement {other:?} is not one of header, envelope, partition"
                            ),
                        ))
                    }
                };
                Ok(Placement {
                    column: column.to_owned(),
                    place,
                    alias: alias.to_owned(),
                })
            })
            .collect()
    }
}

/// Where `table.fields.additional.placement` puts a column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A header named by the alias.
    Header,
    /// A field of the value's envelope, named by the alias (the payload
    /// then goes under `payload`).
    Envelope,
    /// The record's partition (an `integer` column).
    Partition,
}

/// One `column:placement[:alias]` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The column.
    pub column: String,
    /// Where it goes.
    pub place: Place,
    /// Its name there (the column's by default).
    pub alias: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_headers_are_all_none_or_a_list_in_the_file_and_the_environment() {
        let parse =
            |toml: &str| super::super::Config::from_toml(toml).map(|c| c.kafka.metadata_headers);
        assert_eq!(parse("").unwrap(), MetadataHeaders::All);
        assert_eq!(
            parse("[kafka]\nmetadata_headers = \"none\"\n").unwrap(),
            MetadataHeaders::None
        );
        assert_eq!(
            parse("[kafka]\nmetadata_headers = [\"tenant\"]\n").unwrap(),
            MetadataHeaders::Only(vec!["tenant".into()])
        );
        let e = parse("[kafka]\nmetadata_headers = \"some\"\n").unwrap_err();
        assert!(e.to_string().contains("\"all\", \"none\" or a list"), "{e}");
        let mut c = super::super::test_support::valid();
        c.apply_env(super::super::test_support::env(&[(
            "OUTBOX_METADATA_HEADERS",
            "tenant, emitted_at",
        )]))
        .unwrap();
        assert_eq!(
            c.kafka.metadata_headers,
            MetadataHeaders::Only(vec!["tenant".into(), "emitted_at".into()])
        );
        assert!(!c.kafka.metadata_headers.includes("schema_version"));
    }

    #[test]
    fn formats_parse_and_print_their_configuration_spelling() {
        for f in [
            RecordFormat::Pgoutbox,
            RecordFormat::Debezium,
            RecordFormat::Cloudevents,
        ] {
            assert_eq!(f.as_str().parse::<RecordFormat>(), Ok(f));
        }
        let e = "avro".parse::<RecordFormat>().unwrap_err();
        assert!(
            e.contains("\"pgoutbox\", \"debezium\" or \"cloudevents\""),
            "{e}"
        );
    }

    #[test]
    fn event_router_options_keep_debeziums_names_and_defaults() {
        let c: EventRouterConfig = toml::from_str(
            r#"
            "route.by.field" = "aggregate_type"
            "route.topic.replacement" = "events.${routedByValue}"
            "table.fields.additional.placement" = "event_type:header:eventType, created_at:header"
            "#,
        )
        .unwrap();
        assert_eq!(c.route_by_field, "aggregate_type");
        assert_eq!(c.route_topic_regex, "(?<routedByValue>.*)");
        assert_eq!(c.field_event_key, "aggregateid");
        let placements = c.placements().unwrap();
        let placed: Vec<(&str, Place, &str)> = placements
            .iter()
            .map(|p| (p.column.as_str(), p.place, p.alias.as_str()))
            .collect();
        assert_eq!(
            placed,
            [
                ("event_type", Place::Header, "eventType"),
                ("created_at", Place::Header, "created_at")
            ]
        );
        let bad = EventRouterConfig {
            additional_placement: Some("type:body".into()),
            ..EventRouterConfig::default()
        };
        let e = bad.validate().unwrap_err();
        assert!(
            e.to_string()
                .contains("not one of header, envelope, partition"),
            "{e}"
        );
        assert!(toml::from_str::<EventRouterConfig>("\"route.by\" = \"x\"").is_err());
    }
}

//! The `[kafka]` section: brokers, topic templates, producer settings, the
//! in-flight window, and the librdkafka properties passed through (their
//! secrets hidden from `Debug`, the ones pgoutbox manages refused).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use super::delivery::Delivery;
use super::format::{CloudEventsConfig, EventRouterConfig, MetadataHeaders, RecordFormat};
use super::{range, ConfigError, TopicTemplate};

/// librdkafka properties pgoutbox sets itself; configuring them through
/// `kafka.properties` is rejected (they have dedicated settings or protect
/// the delivery guarantees).
pub const MANAGED_PROPERTIES: &[&str] = &[
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "bootstrap.servers",
    "metadata.broker.list",
    "compression.type",
    "compression.codec",
    "linger.ms",
    "queue.buffering.max.ms",
    "message.max.bytes",
    "enable.gapless.guarantee",
    "transactional.id",
    "transaction.timeout.ms",
];

/// The Kafka producer. Its `Debug` output hides secret-looking
/// `properties` values (see [`KafkaConfig::is_secret_property`]).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]` (env `KAFKA_BROKERS`).
    pub brokers: String,
    /// Topic template (env `OUTBOX_TOPIC`): placeholders `{aggregate_type}`,
    /// `{event_type}`, `{table}`; a plain name sends everything to one topic.
    pub topic: String,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd` (env `KAFKA_COMPRESSION`).
    pub compression: String,
    /// librdkafka `linger.ms` (env `KAFKA_LINGER_MS`).
    pub linger_ms: u64,
    /// Largest message the broker accepts (`message.max.bytes`); larger rows
    /// are dead-lettered before they are sent.
    pub message_max_bytes: usize,
    /// Events read and not yet durable, at most (env
    /// `KAFKA_MAX_IN_FLIGHT_EVENTS`); unset, [`KafkaConfig::window_events`]
    /// chooses by the delivery guarantee.
    pub max_in_flight_events: Option<usize>,
    /// Bytes of the records read and not yet durable, at most (env
    /// `KAFKA_MAX_IN_FLIGHT_BYTES`): the same window as
    /// `max_in_flight_events`, counted in bytes.
    pub max_in_flight_bytes: usize,
    /// Per-table topic templates (key: table name, or `schema.table`),
    /// overriding `topic` for that table; logical messages use their prefix
    /// as the table name.
    pub table_topics: BTreeMap<String, String>,
    /// Any other librdkafka property, passed through unchanged (security:
    /// `security.protocol`, `sasl.*`, `ssl.*`; see docs/security-kafka.md).
    /// env `KAFKA_SASL_PASSWORD` sets `sasl.password`.
    pub properties: BTreeMap<String, String>,
    /// A file whose first line is the SASL password (librdkafka
    /// `sasl.password`), read whenever the producer is built, so that the
    /// password need not sit in the config file (env
    /// `KAFKA_SASL_PASSWORD_FILE`). Not together with `sasl.password`.
    pub sasl_password_file: Option<String>,
    /// How records are laid out: `pgoutbox`, `debezium` or `cloudevents`
    /// (env `OUTBOX_RECORD_FORMAT`).
    pub format: RecordFormat,
    /// Which `metadata` keys become headers in pgoutbox's record format
    /// (env `OUTBOX_METADATA_HEADERS`).
    pub metadata_headers: MetadataHeaders,
    /// `[kafka.debezium]`: the Outbox Event Router's options, for
    /// `format = "debezium"`.
    pub debezium: EventRouterConfig,
    /// `[kafka.cloudevents]`: for `format = "cloudevents"`.
    pub cloudevents: CloudEventsConfig,
    /// `at-least-once` (default) or `exactly-once` (env `OUTBOX_DELIVERY`;
    /// docs/exactly-once.md).
    pub delivery: Delivery,
    /// Exactly-once: the producer's `transactional.id` (env
    /// `KAFKA_TRANSACTIONAL_ID`); unset, it is derived from the database's
    /// system identifier, the database and the slot, the same for every
    /// relay serving that stream.
    pub transactional_id: Option<String>,
    /// Exactly-once: the compacted topic that records, in each Kafka
    /// transaction, the stream position it reaches (env
    /// `KAFKA_PROGRESS_TOPIC`).
    pub progress_topic: String,
    /// Exactly-once: a Kafka transaction is committed once it holds this
    /// many events (env `KAFKA_TRANSACTION_MAX_EVENTS`).
    pub transaction_max_events: usize,
    /// Exactly-once: … or once it has been open this long (env
    /// `KAFKA_TRANSACTION_INTERVAL_MS`).
    pub transaction_interval_ms: u64,
    /// Exactly-once: librdkafka's `transaction.timeout.ms`; at most the
    /// brokers' `transaction.max.timeout.ms` (checked at start).
    pub transaction_timeout_ms: u64,
    /// Exactly-once: start even though the progress record belongs to
    /// another stream (`pgoutbox run --reset-progress`; not a file
    /// setting).
    #[serde(skip)]
    pub reset_progress: bool,
}

/// The in-flight window's default, in events, at least once: it fills
/// only if acknowledgements and marks take 0.3 s at 30k events/s, and it
/// kept every drain within 64 MiB (BENCHMARKS.md, session 12).
pub const WINDOW_EVENTS: usize = 10_000;

/// The in-flight window's default, in events, exactly once. A Kafka
/// transaction's events stay in the window until it has committed and
/// their marks are durable, and the events read while it commits wait in
/// the window for the next one: with the at-least-once window, reading
/// stopped for 4.4–5.1 s of an 11-s drain of 1,000,000 events at 100 per
/// PostgreSQL transaction, and twice the window let it go on (drain
/// 0.76–1.00× → 0.88–1.06× the at-least-once relay's rate, peak RSS
/// 51–58 MiB; BENCHMARKS.md, session 20).
pub const WINDOW_EVENTS_EXACTLY_ONCE: usize = 20_000;

impl KafkaConfig {
    /// The in-flight window in events: `max_in_flight_events` when set,
    /// otherwise [`WINDOW_EVENTS`] at least once and
    /// [`WINDOW_EVENTS_EXACTLY_ONCE`] exactly once.
    pub fn window_events(&self) -> usize {
        self.max_in_flight_events.unwrap_or(match self.delivery {
            Delivery::AtLeastOnce => WINDOW_EVENTS,
            Delivery::ExactlyOnce => WINDOW_EVENTS_EXACTLY_ONCE,
        })
    }

    /// True for librdkafka properties whose value is a secret (passwords,
    /// client secrets, private keys): never logged or printed.
    pub fn is_secret_property(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        ["password", "secret", "passphrase", "key.pem", "private.key"]
            .iter()
            .any(|word| key.contains(word))
            || key == "sasl.oauthbearer.config"
            || key == "ssl_key"
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if Self::is_secret_property(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("compression", &self.compression)
            .field("linger_ms", &self.linger_ms)
            .field("message_max_bytes", &self.message_max_bytes)
            .field("max_in_flight_events", &self.window_events())
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("table_topics", &self.table_topics)
            .field("properties", &properties)
            .field("sasl_password_file", &self.sasl_password_file)
            .field("format", &self.format)
            .field("metadata_headers", &self.metadata_headers)
            .field("debezium", &self.debezium)
            .field("cloudevents", &self.cloudevents)
            .field("delivery", &self.delivery)
            .field("transactional_id", &self.transactional_id)
            .field("progress_topic", &self.progress_topic)
            .field("transaction_max_events", &self.transaction_max_events)
            .field("transaction_interval_ms", &self.transaction_interval_ms)
            .field("transaction_timeout_ms", &self.transaction_timeout_ms)
            .finish()
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            topic: "{aggregate_type}.{event_type}".into(),
            compression: "lz4".into(),
            linger_ms: 5,
            message_max_bytes: 1_000_000,
            max_in_flight_events: None,
            max_in_flight_bytes: 64 << 20,
            table_topics: BTreeMap::new(),
            properties: BTreeMap::new(),
            sasl_password_file: None,
            format: RecordFormat::Pgoutbox,
            metadata_headers: MetadataHeaders::All,
            debezium: EventRouterConfig::default(),
            cloudevents: CloudEventsConfig::default(),
            delivery: Delivery::AtLeastOnce,
            transactional_id: None,
            progress_topic: "pgoutbox.progress".into(),
            transaction_max_events: 10_000,
            transaction_interval_ms: 25,
            transaction_timeout_ms: 60_000,
            reset_progress: false,
        }
    }
}

impl KafkaConfig {
    /// Checks every field except that brokers are set (only `run` needs
    /// them: see `Config::require_kafka`).
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.debezium.validate()?;
        self.cloudevents.validate()?;
        for broker in self
            .brokers
            .split(',')
            .filter(|_| !self.brokers.trim().is_empty())
        {
            let b = broker.trim();
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(ConfigError::new(
                    "kafka.brokers",
                    format!("{b:?} is not host:port"),
                ));
            }
        }
        TopicTemplate::parse(&self.topic)
            .map_err(|e| ConfigError::new("kafka.topic", e.to_string()))?;
        for (table, template) in &self.table_topics {
            TopicTemplate::parse(template).map_err(|e| {
                ConfigError::new(format!("kafka.table_topics.{table}"), e.to_string())
            })?;
        }
        match self.compression.as_str() {
            "none" | "gzip" | "snappy" | "lz4" | "zstd" => {}
            other => {
                return Err(ConfigError::new(
                    "kafka.compression",
                    format!("{other:?} is not one of none, gzip, snappy, lz4, zstd"),
                ))
            }
        }
        range("kafka.linger_ms", self.linger_ms, 0, 900_000)?;
        range(
            "kafka.message_max_bytes",
            self.message_max_bytes as u64,
            1000,
            1_000_000_000,
        )?;
        if let Some(events) = self.max_in_flight_events {
            range("kafka.max_in_flight_events", events as u64, 1, 10_000_000)?;
        }
        range(
            "kafka.max_in_flight_bytes",
            self.max_in_flight_bytes as u64,
            1024,
            1 << 34,
        )?;
        self.validate_delivery()?;
        self.validate_properties()
    }

    /// Checks `properties` and `sasl_password_file`: no managed property,
    /// one source for the SASL password, and a file only with SASL.
    fn validate_properties(&self) -> Result<(), ConfigError> {
        for key in self.properties.keys() {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    format!("kafka.properties.{key}"),
                    "is set by pgoutbox for delivery guarantees and cannot be overridden",
                ));
            }
        }
        if self.sasl_password_file.is_some() {
            if self.properties.contains_key("sasl.password") {
                return Err(ConfigError::new(
                    "kafka.sasl_password_file",
                    "cannot be combined with kafka.properties.\"sasl.password\" or KAFKA_SASL_PASSWORD; set one of them",
                ));
            }
            let protocol = self
                .properties
                .get("security.protocol")
                .map(|p| p.to_ascii_lowercase())
                .unwrap_or_else(|| "plaintext".into());
            if protocol != "sasl_ssl" && protocol != "sasl_plaintext" {
                return Err(ConfigError::new(
                    "kafka.sasl_password_file",
                    format!("is set but kafka.properties.\"security.protocol\" is {protocol:?}; the password is used only with SASL_SSL or SASL_PLAINTEXT"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, valid};

    #[test]
    fn managed_kafka_properties_cannot_be_overridden() {
        let mut c = valid();
        c.kafka
            .properties
            .insert("enable.idempotence".into(), "false".into());
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.properties.enable.idempotence"
        );
    }

    #[test]
    fn kafka_secrets_are_hidden_in_debug_output() {
        let mut c = valid();
        for (k, v) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.username", "relay"),
            ("sasl.password", "pw-one"),
            ("ssl.key.password", "pw-two"),
            ("sasl.oauthbearer.client.secret", "pw-three"),
            ("ssl.key.pem", "pw-four"),
        ] {
            c.kafka.properties.insert(k.into(), v.into());
        }
        let text = format!("{c:?}");
        assert!(!text.contains("pw-"), "{text}");
        assert!(
            text.contains("SASL_SSL") && text.contains("relay"),
            "{text}"
        );
    }

    #[test]
    fn sasl_password_from_env_or_file() {
        let mut c = valid();
        c.kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        c.apply_env(env(&[("KAFKA_SASL_PASSWORD", "s3")])).unwrap();
        assert_eq!(c.kafka.properties["sasl.password"], "s3");
        c.validate().unwrap();
        c.apply_env(env(&[("KAFKA_SASL_PASSWORD_FILE", "/run/secrets/kafka")]))
            .unwrap();
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.sasl_password_file",
            "both sources"
        );
        c.kafka.properties.remove("sasl.password");
        c.validate().unwrap();
        c.kafka.properties.remove("security.protocol");
        let e = c.validate().unwrap_err();
        assert!(e.problem.contains("SASL_SSL"), "{e}");
    }
}

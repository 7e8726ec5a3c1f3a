//! Configuration: a TOML file, then environment variables, validated.
//!
//! Precedence is file < environment < command line. Every value is checked
//! before any connection is made; a problem is reported as one line naming the
//! field and the constraint it breaks. Unknown keys are rejected, so a typo
//! never silently falls back to a default.
//!
//! Environment variables keep the names of the seed framework
//! (`DATABASE_URL`, `OUTBOX_BATCH_SIZE`, `OUTBOX_LEASE_SECONDS`,
//! `OUTBOX_POLL_INTERVAL_MS`, `OUTBOX_MAX_RETRIES`) and add `KAFKA_BROKERS` and
//! the `OUTBOX_*` settings listed in [`ENV_VARS`].
//!
//! One file per section, each with its defaults and its own checks:
//! `database`, `outbox`, `cdc`, `poll`, `kafka`, `log`, `metrics`,
//! `partitions`, `runtime`, and `mode` for the top-level key; `env` maps the
//! environment variables onto them. This module holds the whole
//! [`Config`], loading, and the order in which the sections are checked.

mod cdc;
mod columns;
mod database;
mod delivery;
mod duration;
mod env;
mod format;
mod health;
mod identifier;
mod kafka;
mod log;
mod metrics;
mod mode;
mod outbox;
mod partitions;
mod poll;
mod runtime;
mod tls;
mod topic;
mod url_tls;

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

pub use cdc::{CdcConfig, MarkWith, SlotLostPolicy};
pub use columns::{
    ColumnMap, ColumnsConfig, Role, RoleColumn, TablePreset, MARKING_COLUMNS, ROW_STATE_COLUMNS,
};
pub use database::{DatabaseConfig, DatabaseUrl};
pub use delivery::Delivery;
pub use duration::parse_duration;
pub use env::ENV_VARS;
pub use format::{
    CloudEventsConfig, CloudEventsMode, DebeziumConverter, EventRouterConfig, MetadataHeaders,
    Place, Placement, RecordFormat,
};
pub use health::{HealthConfig, Levels};
pub use identifier::{quote_ident, quote_literal, validate_identifier, validate_slot_name};
pub use kafka::{KafkaConfig, MANAGED_PROPERTIES, WINDOW_EVENTS, WINDOW_EVENTS_EXACTLY_ONCE};
pub use log::LogConfig;
pub use metrics::MetricsConfig;
pub use mode::Mode;
pub use outbox::{check_audit_names, OutboxConfig, AUDIT_FUNCTION_SUFFIX};
pub use partitions::{PartitionInterval, PartitionsConfig};
pub use poll::{PollConfig, PollOrdering};
pub use runtime::RuntimeConfig;
pub use tls::{RootCerts, Sourced, TlsMode, TlsSettings};
pub use topic::{TopicError, TopicField, TopicTemplate};
pub use url_tls::{split_tls_params, UrlTls};

/// A configuration problem: which field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("config: {field}: {problem}")]
pub struct ConfigError {
    /// The dotted field name (`kafka.brokers`) or environment variable.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub problem: String,
}

impl ConfigError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How rows are read.
    pub mode: Mode,
    /// PostgreSQL connection.
    pub database: DatabaseConfig,
    /// The outbox table and its semantics.
    pub outbox: OutboxConfig,
    /// Logical replication settings.
    pub cdc: CdcConfig,
    /// Poll mode settings.
    pub poll: PollConfig,
    /// The Kafka producer.
    pub kafka: KafkaConfig,
    /// Logging.
    pub log: LogConfig,
    /// Metrics, health endpoints and the sampler.
    pub metrics: MetricsConfig,
    /// When the outbox counts as degraded or unhealthy.
    pub health: HealthConfig,
    /// Partition lifecycle: create ahead, retention.
    pub partitions: PartitionsConfig,
    /// The process's async runtime.
    pub runtime: RuntimeConfig,
}

impl Config {
    /// The columns events are read with: the roles of `[outbox.columns]`,
    /// plus every other column the `debezium` record format names (its
    /// routing, key, id and payload fields and additional placements).
    pub fn event_columns(&self) -> Result<ColumnMap, ConfigError> {
        let mut map = self.outbox.column_map()?;
        if self.kafka.format == RecordFormat::Debezium {
            let d = &self.kafka.debezium;
            for name in [
                &d.field_event_id,
                &d.field_event_key,
                &d.field_event_payload,
                &d.route_by_field,
            ] {
                map = map.with_additional(name);
            }
            for placed in d.placements()? {
                map = map.with_additional(&placed.column);
            }
            if let Some(column) = &d.field_event_timestamp {
                map = map.with_additional(column);
            }
        }
        Ok(map)
    }

    /// Reads `path` (if any), then applies the environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("--config", format!("cannot read {}: {e}", path.display()))
        })?;
        Config::from_toml(&text)
            .map_err(|e| ConfigError::new(format!("{}: {}", path.display(), e.field), e.problem))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let msg = e.message().to_owned();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "file".into());
            ConfigError::new(at, msg)
        })
    }

    /// Checks every field; the first problem found is returned.
    ///
    /// Sections are checked in a fixed order, which decides the error when
    /// more than one field is wrong: the database, then the names that end
    /// up in SQL (outbox, then CDC), the runtime, then the numeric limits of
    /// outbox, poll and CDC, then Kafka, metrics, partitions and logging.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.outbox.validate_names()?;
        self.cdc.validate_names()?;
        self.runtime.validate()?;
        self.outbox.validate_limits()?;
        self.cdc.validate_policy(self.outbox.mark_completed)?;
        if self.kafka.delivery == Delivery::ExactlyOnce
            && self.cdc.on_slot_lost == Some(SlotLostPolicy::Poll)
        {
            return Err(ConfigError::new(
                "cdc.on_slot_lost",
                "\"poll\" falls back to poll mode, which delivers at least once, while kafka.delivery is \"exactly-once\"; set on_slot_lost = \"recreate\" (the new slot's backfill skips what Kafka has) or \"stop\"",
            ));
        }
        if self.kafka.delivery == Delivery::ExactlyOnce && !self.outbox.mark_completed {
            return Err(ConfigError::new(
                "kafka.delivery",
                "exactly-once needs outbox.mark_completed = true: a backfill from a new slot tells the rows Kafka already has from the others by their COMPLETED mark; set mark_completed = true, or kafka.delivery = \"at-least-once\"",
            ));
        }
        self.poll.validate()?;
        self.cdc.validate_limits()?;
        self.kafka.validate()?;
        self.metrics.validate()?;
        self.health.validate()?;
        self.partitions.validate()?;
        self.log.validate()?;
        Ok(())
    }

    /// Checks what only `run` needs: the Kafka brokers (`migrate` and `dle`
    /// never connect to Kafka), and a delivery guarantee its mode can give.
    pub fn require_kafka(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.brokers",
                "is required: set KAFKA_BROKERS or kafka.brokers (host:port[,host:port])",
            ));
        }
        self.kafka.require_delivery_mode(self.mode)
    }

    /// The status update interval, capped at half the server's
    /// `wal_sender_timeout` (0 = disabled on the server).
    pub fn status_interval(&self, wal_sender_timeout: Duration) -> Duration {
        let configured = Duration::from_millis(self.cdc.status_interval_ms);
        if wal_sender_timeout.is_zero() {
            configured.min(Duration::from_secs(10))
        } else {
            configured
                .min(wal_sender_timeout / 2)
                .min(Duration::from_secs(10))
        }
    }
}

/// Checks that `value` lies in `min..=max`.
fn range(field: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        Err(ConfigError::new(
            field,
            format!("{value} is out of range; allowed {min}..={max}"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod test_support {
    //! Helpers shared by the sections' tests.

    use std::collections::BTreeMap;

    use super::Config;

    /// An environment holding `pairs`, for [`Config::apply_env`].
    pub(super) fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// The defaults plus the two required settings: valid.
    pub(super) fn valid() -> Config {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("DATABASE_URL", "postgres://u:secret@127.0.0.1:5432/db"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ]))
        .unwrap();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{env, valid};
    use super::*;

    #[test]
    fn defaults_with_required_env_validate() {
        valid().validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let e = Config::from_toml("[kafka]\nbrokers = \"a:1\"\nlinger = 5\n").unwrap_err();
        assert!(e.to_string().contains("linger"), "{e}");
        assert!(e.field.contains("line 3"), "{e}");
    }

    #[test]
    fn injection_in_identifiers_is_rejected_before_sql() {
        for (field, set) in [
            (
                "cdc.slot",
                (|c: &mut Config| c.cdc.slot = "x; DROP TABLE outbox".into()) as fn(&mut Config),
            ),
            ("cdc.publication", |c: &mut Config| {
                c.cdc.publication = "p\" OR 1=1 --".into()
            }),
            ("outbox.table", |c: &mut Config| {
                c.outbox.table = "outbox'".into()
            }),
        ] {
            let mut c = valid();
            set(&mut c);
            assert_eq!(c.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn missing_brokers_say_what_to_set() {
        let mut c = valid();
        c.kafka.brokers.clear();
        // Only `run` needs Kafka.
        c.validate().unwrap();
        let e = c.require_kafka().unwrap_err();
        assert!(e.to_string().contains("KAFKA_BROKERS"));
    }

    #[test]
    fn status_interval_is_capped_by_wal_sender_timeout() {
        let mut c = valid();
        c.cdc.status_interval_ms = 20_000;
        assert_eq!(
            c.status_interval(Duration::from_secs(60)),
            Duration::from_secs(10)
        );
        assert_eq!(
            c.status_interval(Duration::from_secs(4)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn example_config_file_parses_and_validates() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pgoutbox.toml");
        let mut c = Config::from_file(Path::new(path)).unwrap();
        c.apply_env(env(&[
            ("DATABASE_URL", "postgres://u:p@h:1/d"),
            ("KAFKA_BROKERS", "k:9092"),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.kafka.topic, "{aggregate_type}.{event_type}");
        assert_eq!(
            c.health,
            HealthConfig::default(),
            "the file shows the defaults"
        );
    }
}

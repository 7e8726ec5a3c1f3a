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

mod duration;
mod identifier;
mod metrics;
mod partitions;
mod tls;
mod topic;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

pub use duration::parse_duration;
pub use identifier::{quote_ident, validate_identifier, validate_slot_name};
pub use metrics::MetricsConfig;
pub use partitions::{PartitionInterval, PartitionsConfig};
pub use tls::{split_tls_params, RootCerts, Sourced, TlsMode, TlsSettings, UrlTls};
pub use topic::{TopicError, TopicField, TopicTemplate};

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

/// The database connection URL. Its `Debug` and `Display` never show the
/// password.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL or libpq key/value string.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// The full text, secrets included: pass it only to a connector.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Parses into a tokio-postgres configuration, without the TLS
    /// parameters (see [`DatabaseUrl::parse_with_tls`]). The error never
    /// repeats the URL.
    pub fn parse(&self) -> Result<tokio_postgres::Config, ConfigError> {
        self.parse_with_tls().map(|(pg, _)| pg)
    }

    /// Parses into a tokio-postgres configuration and libpq's TLS
    /// parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), which
    /// tokio-postgres does not fully understand and are taken out first.
    pub fn parse_with_tls(&self) -> Result<(tokio_postgres::Config, UrlTls), ConfigError> {
        let (rest, tls) =
            split_tls_params(&self.0).map_err(|e| ConfigError::new("database.url", e))?;
        let pg = tokio_postgres::Config::from_str(&rest).map_err(|e| {
            ConfigError::new(
                "database.url",
                format!(
                    "not a valid PostgreSQL URL or key=value string ({}); expected postgres://user:password@host:port/dbname",
                    crate::redact::error_text(&crate::redact::postgres_text(&e), &self.0)
                ),
            )
        })?;
        Ok((pg, tls))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", crate::redact::url(&self.0))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

/// How the relay reads the outbox.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Logical replication (pgoutput) from a replication slot.
    #[default]
    Cdc,
    /// Claim rows from the table with leases (`FOR UPDATE SKIP LOCKED`).
    Poll,
    /// CDC when the server allows it, poll otherwise (decided at start).
    Auto,
}

impl Mode {
    /// The name used in config, logs and the `--mode` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cdc => "cdc",
            Mode::Poll => "poll",
            Mode::Auto => "auto",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cdc" => Ok(Mode::Cdc),
            "poll" => Ok(Mode::Poll),
            "auto" => Ok(Mode::Auto),
            other => Err(format!(
                "unknown mode {other:?}; expected \"cdc\", \"poll\" or \"auto\""
            )),
        }
    }
}

/// Per-aggregate ordering in poll mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PollOrdering {
    /// The seed's behaviour: with more than one worker, or after a retry,
    /// events of one aggregate may be published out of order.
    #[default]
    None,
    /// An event is claimed only when every older event of its aggregate is
    /// `COMPLETED`: order holds across workers, relays and retries, and a
    /// dead-lettered event blocks its aggregate until redriven or skipped.
    Aggregate,
}

/// Poll mode settings beyond the seed's (`outbox.batch_size`,
/// `outbox.lease_seconds`, `outbox.poll_interval_ms`, `outbox.max_retries`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Concurrent workers, each claiming its own batches
    /// (env `OUTBOX_CONCURRENCY`).
    pub concurrency: u32,
    /// `none` (the seed's) or `aggregate` (env `OUTBOX_ORDERING`).
    pub ordering: PollOrdering,
    /// Install the AFTER INSERT trigger that wakes idle pollers through
    /// `LISTEN/NOTIFY` (applied by `pgoutbox migrate`; env `OUTBOX_NOTIFY`).
    /// Each inserting transaction then takes PostgreSQL's notification
    /// queue lock at commit, which serialises those commits.
    pub notify: bool,
    /// First retry delay after a failed send, in milliseconds; doubled per
    /// attempt, with jitter.
    pub backoff_base_ms: u64,
    /// Upper bound of the retry delay, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            concurrency: 1,
            ordering: PollOrdering::None,
            notify: false,
            backoff_base_ms: 1000,
            backoff_max_ms: 300_000,
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
    /// Partition lifecycle: create ahead, retention.
    pub partitions: PartitionsConfig,
    /// The process's async runtime.
    pub runtime: RuntimeConfig,
}

/// The async runtime the relay runs on.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Tokio worker threads (env `OUTBOX_WORKER_THREADS`). One by default:
    /// the CDC stream is one ordered sequence, the heavy lifting happens in
    /// librdkafka's own threads and in PostgreSQL, and a second worker only
    /// adds cross-thread wake-ups (measured on 2 cores: one worker drains
    /// about 40 % faster with about 35 % less CPU; poll mode with 4 workers
    /// is unchanged). More may help poll mode with high `poll.concurrency`
    /// on a large machine.
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
    }
}

/// PostgreSQL connection settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host:port/dbname` (env `DATABASE_URL`).
    pub url: DatabaseUrl,
    /// A file whose first line is the password, used when the URL has none
    /// (env `DATABASE_PASSWORD_FILE`).
    pub password_file: Option<String>,
    /// Seconds to wait for a connection before giving up on one attempt.
    pub connect_timeout_s: u64,
    /// TLS mode when the URL has no `sslmode`: `disable`, `allow`,
    /// `prefer`, `require`, `verify-ca` or `verify-full` (env
    /// `DATABASE_TLS_MODE`). Unset: `prefer` for loopback hosts and Unix
    /// sockets, `verify-full` for any other host.
    pub tls_mode: Option<TlsMode>,
    /// PEM file of the CA certificates that may sign the server's
    /// certificate, or `system`, when the URL has no `sslrootcert` (env
    /// `DATABASE_TLS_ROOT_CERT`). Unset: the system's trust store.
    pub tls_root_cert: Option<String>,
    /// PEM client certificate chain, when the URL has no `sslcert` (env
    /// `DATABASE_TLS_CLIENT_CERT`).
    pub tls_client_cert: Option<String>,
    /// PEM private key of the client certificate, when the URL has no
    /// `sslkey` (env `DATABASE_TLS_CLIENT_KEY`).
    pub tls_client_key: Option<String>,
}

impl DatabaseConfig {
    /// The URL's connection settings and the TLS settings in force (the
    /// URL's parameters win over `tls_*`), checked: certificate files
    /// exist, a client certificate has its key.
    pub fn connection(&self) -> Result<(tokio_postgres::Config, TlsSettings), ConfigError> {
        let (pg, url_tls) = self.url.parse_with_tls()?;
        let tls = tls::resolve(self, url_tls, &pg)?;
        Ok((pg, tls))
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: DatabaseUrl::default(),
            password_file: None,
            connect_timeout_s: 10,
            tls_mode: None,
            tls_root_cert: None,
            tls_client_cert: None,
            tls_client_key: None,
        }
    }
}

/// The outbox table and the seed's processing settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Schema of the outbox table (env `OUTBOX_SCHEMA`).
    pub schema: String,
    /// Name of the outbox table (env `OUTBOX_TABLE`).
    pub table: String,
    /// Rows claimed per batch in poll mode (env `OUTBOX_BATCH_SIZE`).
    pub batch_size: u32,
    /// Lease length for claimed rows in poll mode (env `OUTBOX_LEASE_SECONDS`).
    pub lease_seconds: u32,
    /// Poll interval in poll mode (env `OUTBOX_POLL_INTERVAL_MS`).
    pub poll_interval_ms: u64,
    /// Default attempts before a row is dead-lettered (env `OUTBOX_MAX_RETRIES`).
    pub max_retries: u32,
    /// Mark delivered rows `COMPLETED` (env `OUTBOX_MARK_COMPLETED`).
    pub mark_completed: bool,
    /// Record every status change in `<table>_status_audit` (the seed's
    /// `ENABLE_AUDIT`; env `ENABLE_AUDIT`, `migrate --audit` /
    /// `--no-audit`), applied by `pgoutbox migrate`: `true` installs the
    /// trigger, `false` drops it (the table is kept), unset leaves it as it
    /// is. See docs/audit.md.
    pub audit: Option<bool>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            schema: "public".into(),
            table: "outbox".into(),
            batch_size: 100,
            lease_seconds: 30,
            poll_interval_ms: 1000,
            max_retries: 5,
            mark_completed: true,
            audit: None,
        }
    }
}

/// Logical replication settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcConfig {
    /// Replication slot name (env `OUTBOX_SLOT`).
    pub slot: String,
    /// Publication name (env `OUTBOX_PUBLICATION`).
    pub publication: String,
    /// How often to send a standby status update, in milliseconds; capped at
    /// half the server's `wal_sender_timeout`.
    pub status_interval_ms: u64,
    /// XLogData messages buffered between the socket and the decoder.
    pub read_buffer: usize,
    /// Seconds a graceful shutdown waits for Kafka acks before giving up.
    pub shutdown_timeout_s: u64,
    /// Upper bound of the reconnect backoff, in milliseconds.
    pub max_backoff_ms: u64,
    /// Rows per `COMPLETED` / `DEAD_LETTER` update statement.
    pub mark_batch_size: usize,
    /// How long the status writer gathers marks before an update statement
    /// that would carry fewer than `mark_batch_size` rows, in milliseconds.
    /// Fewer, larger statements cost PostgreSQL far less per row (one commit
    /// and one plan per statement); the price is this much more time before
    /// the slot's flush LSN passes an event, never on Kafka delivery.
    pub mark_linger_ms: u64,
    /// Relay table-less events written with `pg_logical_emit_message`
    /// (env `OUTBOX_MESSAGES`).
    pub messages: bool,
    /// The logical message prefix that marks an outbox event
    /// (env `OUTBOX_MESSAGE_PREFIX`).
    pub message_prefix: String,
    /// Also relay non-transactional messages. Off by default: any role can
    /// emit them, and they are sent even when the writer's transaction
    /// rolls back.
    pub non_transactional_messages: bool,
    /// `any` relays changes from every origin; `none` (PostgreSQL 16+) only
    /// changes made locally, not those applied by logical replication.
    pub origin: String,
    /// Ask the server to stream large in-progress transactions. Their changes
    /// are held in memory until Stream Commit (dropped on Stream Abort) and
    /// never published early; off by default.
    pub streaming: bool,
    /// Force a pgoutput protocol version (1-4); by default the highest the
    /// server supports.
    pub protocol_version: Option<u32>,
    /// With `mode = "auto"`: when the replication slot is lost (dropped or
    /// invalidated), keep delivering by polling instead of stopping
    /// (env `OUTBOX_FALLBACK_TO_POLL`). Off by default: a lost slot is for
    /// an operator to look at.
    pub fallback_to_poll: bool,
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            slot: "pgoutbox".into(),
            publication: "outbox_pub".into(),
            status_interval_ms: 1000,
            read_buffer: 4096,
            shutdown_timeout_s: 30,
            max_backoff_ms: 30_000,
            mark_batch_size: 2000,
            mark_linger_ms: 20,
            messages: true,
            message_prefix: "outbox".into(),
            non_transactional_messages: false,
            origin: "any".into(),
            streaming: false,
            protocol_version: None,
            fallback_to_poll: false,
        }
    }
}

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
];

/// The suffix of the audit trigger function's name, `<table>_status_audit_fn`:
/// the longest name derived from `outbox.table`.
pub const AUDIT_FUNCTION_SUFFIX: &str = "_status_audit_fn";

/// Checks that the names the audit derives from `table` fit PostgreSQL's 63
/// bytes (PostgreSQL would silently truncate them).
pub fn check_audit_names(table: &str) -> Result<(), ConfigError> {
    let max = 63 - AUDIT_FUNCTION_SUFFIX.len();
    if table.len() > max {
        return Err(ConfigError::new(
            "outbox.audit",
            format!(
                "the audit needs the table name to be at most {max} bytes (it names <table>{AUDIT_FUNCTION_SUFFIX}); {table:?} has {}",
                table.len()
            ),
        ));
    }
    Ok(())
}

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
    /// Events sent but not yet acknowledged, at most.
    pub max_in_flight_events: usize,
    /// Bytes of payload sent but not yet acknowledged, at most.
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
}

impl KafkaConfig {
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
            .field("max_in_flight_events", &self.max_in_flight_events)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("table_topics", &self.table_topics)
            .field("properties", &properties)
            .field("sasl_password_file", &self.sasl_password_file)
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
            max_in_flight_events: 50_000,
            max_in_flight_bytes: 64 << 20,
            table_topics: BTreeMap::new(),
            properties: BTreeMap::new(),
            sasl_password_file: None,
        }
    }
}

/// Logging.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `pgoutbox=debug` (env `RUST_LOG` wins).
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: "text".into(),
        }
    }
}

/// The environment variables read, in the order applied.
pub const ENV_VARS: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_PASSWORD_FILE",
    "DATABASE_TLS_MODE",
    "DATABASE_TLS_ROOT_CERT",
    "DATABASE_TLS_CLIENT_CERT",
    "DATABASE_TLS_CLIENT_KEY",
    "OUTBOX_SCHEMA",
    "OUTBOX_TABLE",
    "OUTBOX_BATCH_SIZE",
    "OUTBOX_LEASE_SECONDS",
    "OUTBOX_POLL_INTERVAL_MS",
    "OUTBOX_MAX_RETRIES",
    "OUTBOX_MARK_COMPLETED",
    "ENABLE_AUDIT",
    "OUTBOX_MODE",
    "OUTBOX_CONCURRENCY",
    "OUTBOX_ORDERING",
    "OUTBOX_NOTIFY",
    "OUTBOX_FALLBACK_TO_POLL",
    "OUTBOX_SLOT",
    "OUTBOX_PUBLICATION",
    "OUTBOX_TOPIC",
    "OUTBOX_MESSAGES",
    "OUTBOX_MESSAGE_PREFIX",
    "KAFKA_BROKERS",
    "KAFKA_COMPRESSION",
    "KAFKA_LINGER_MS",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SASL_PASSWORD_FILE",
    "OUTBOX_METRICS_LISTEN",
    "OUTBOX_WORKER_THREADS",
];

fn parse_env<T: FromStr>(name: &str, value: &str, what: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| ConfigError::new(name, format!("{value:?} is not {what}")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::new(
            name,
            format!("{value:?} is not a boolean (true/false)"),
        )),
    }
}

impl Config {
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

    /// Applies environment variables (looked up through `get`) over the
    /// current values.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        if let Some(v) = get("DATABASE_URL") {
            self.database.url = DatabaseUrl::new(v);
        }
        if let Some(v) = get("DATABASE_PASSWORD_FILE") {
            self.database.password_file = Some(v);
        }
        if let Some(v) = get("DATABASE_TLS_MODE") {
            self.database.tls_mode = Some(
                v.parse()
                    .map_err(|e: String| ConfigError::new("DATABASE_TLS_MODE", e))?,
            );
        }
        if let Some(v) = get("DATABASE_TLS_ROOT_CERT") {
            self.database.tls_root_cert = Some(v);
        }
        if let Some(v) = get("DATABASE_TLS_CLIENT_CERT") {
            self.database.tls_client_cert = Some(v);
        }
        if let Some(v) = get("DATABASE_TLS_CLIENT_KEY") {
            self.database.tls_client_key = Some(v);
        }
        if let Some(v) = get("OUTBOX_SCHEMA") {
            self.outbox.schema = v;
        }
        if let Some(v) = get("OUTBOX_TABLE") {
            self.outbox.table = v;
        }
        if let Some(v) = get("OUTBOX_BATCH_SIZE") {
            self.outbox.batch_size = parse_env("OUTBOX_BATCH_SIZE", &v, "a whole number")?;
        }
        if let Some(v) = get("OUTBOX_LEASE_SECONDS") {
            self.outbox.lease_seconds = parse_env("OUTBOX_LEASE_SECONDS", &v, "a whole number")?;
        }
        if let Some(v) = get("OUTBOX_POLL_INTERVAL_MS") {
            self.outbox.poll_interval_ms =
                parse_env("OUTBOX_POLL_INTERVAL_MS", &v, "a whole number")?;
        }
        if let Some(v) = get("OUTBOX_MAX_RETRIES") {
            self.outbox.max_retries = parse_env("OUTBOX_MAX_RETRIES", &v, "a whole number")?;
        }
        if let Some(v) = get("OUTBOX_MARK_COMPLETED") {
            self.outbox.mark_completed = parse_bool("OUTBOX_MARK_COMPLETED", &v)?;
        }
        if let Some(v) = get("ENABLE_AUDIT") {
            self.outbox.audit = Some(parse_bool("ENABLE_AUDIT", &v)?);
        }
        if let Some(v) = get("OUTBOX_MODE") {
            self.mode = v
                .trim()
                .parse()
                .map_err(|e: String| ConfigError::new("OUTBOX_MODE", e))?;
        }
        if let Some(v) = get("OUTBOX_CONCURRENCY") {
            self.poll.concurrency = parse_env("OUTBOX_CONCURRENCY", &v, "a whole number")?;
        }
        if let Some(v) = get("OUTBOX_ORDERING") {
            self.poll.ordering = match v.trim() {
                "none" => PollOrdering::None,
                "aggregate" => PollOrdering::Aggregate,
                other => {
                    return Err(ConfigError::new(
                        "OUTBOX_ORDERING",
                        format!("{other:?} is not \"none\" or \"aggregate\""),
                    ))
                }
            };
        }
        if let Some(v) = get("OUTBOX_NOTIFY") {
            self.poll.notify = parse_bool("OUTBOX_NOTIFY", &v)?;
        }
        if let Some(v) = get("OUTBOX_FALLBACK_TO_POLL") {
            self.cdc.fallback_to_poll = parse_bool("OUTBOX_FALLBACK_TO_POLL", &v)?;
        }
        if let Some(v) = get("OUTBOX_SLOT") {
            self.cdc.slot = v;
        }
        if let Some(v) = get("OUTBOX_PUBLICATION") {
            self.cdc.publication = v;
        }
        if let Some(v) = get("OUTBOX_TOPIC") {
            self.kafka.topic = v;
        }
        if let Some(v) = get("OUTBOX_MESSAGES") {
            self.cdc.messages = parse_bool("OUTBOX_MESSAGES", &v)?;
        }
        if let Some(v) = get("OUTBOX_MESSAGE_PREFIX") {
            self.cdc.message_prefix = v;
        }
        if let Some(v) = get("KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("KAFKA_COMPRESSION") {
            self.kafka.compression = v;
        }
        if let Some(v) = get("KAFKA_LINGER_MS") {
            self.kafka.linger_ms = parse_env("KAFKA_LINGER_MS", &v, "a whole number")?;
        }
        if let Some(v) = get("KAFKA_SASL_PASSWORD") {
            self.kafka.properties.insert("sasl.password".into(), v);
        }
        if let Some(v) = get("KAFKA_SASL_PASSWORD_FILE") {
            self.kafka.sasl_password_file = Some(v);
        }
        if let Some(v) = get("OUTBOX_METRICS_LISTEN") {
            self.metrics.listen = v;
        }
        if let Some(v) = get("OUTBOX_WORKER_THREADS") {
            self.runtime.worker_threads = parse_env("OUTBOX_WORKER_THREADS", &v, "a whole number")?;
        }
        Ok(())
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.database.url.expose().is_empty() {
            return Err(ConfigError::new(
                "database.url",
                "is required: set DATABASE_URL or database.url (postgres://user:password@host:port/dbname)",
            ));
        }
        self.database.connection()?;
        if self.database.connect_timeout_s == 0 {
            return Err(ConfigError::new(
                "database.connect_timeout_s",
                "must be at least 1",
            ));
        }
        validate_identifier("outbox.schema", &self.outbox.schema)?;
        validate_identifier("outbox.table", &self.outbox.table)?;
        if self.outbox.audit == Some(true) {
            check_audit_names(&self.outbox.table)?;
        }
        validate_slot_name("cdc.slot", &self.cdc.slot)?;
        validate_identifier("cdc.publication", &self.cdc.publication)?;
        range(
            "runtime.worker_threads",
            self.runtime.worker_threads as u64,
            1,
            256,
        )?;
        range(
            "outbox.batch_size",
            self.outbox.batch_size as u64,
            1,
            100_000,
        )?;
        range(
            "outbox.lease_seconds",
            self.outbox.lease_seconds as u64,
            1,
            86_400,
        )?;
        range(
            "outbox.poll_interval_ms",
            self.outbox.poll_interval_ms,
            1,
            3_600_000,
        )?;
        range(
            "outbox.max_retries",
            self.outbox.max_retries as u64,
            1,
            1_000_000,
        )?;
        range("poll.concurrency", self.poll.concurrency as u64, 1, 256)?;
        range(
            "poll.backoff_base_ms",
            self.poll.backoff_base_ms,
            1,
            3_600_000,
        )?;
        range(
            "poll.backoff_max_ms",
            self.poll.backoff_max_ms,
            self.poll.backoff_base_ms,
            86_400_000,
        )?;
        range(
            "cdc.status_interval_ms",
            self.cdc.status_interval_ms,
            10,
            600_000,
        )?;
        range("cdc.read_buffer", self.cdc.read_buffer as u64, 1, 1_000_000)?;
        range(
            "cdc.shutdown_timeout_s",
            self.cdc.shutdown_timeout_s,
            0,
            3600,
        )?;
        range("cdc.max_backoff_ms", self.cdc.max_backoff_ms, 10, 3_600_000)?;
        range(
            "cdc.mark_batch_size",
            self.cdc.mark_batch_size as u64,
            1,
            100_000,
        )?;
        range("cdc.mark_linger_ms", self.cdc.mark_linger_ms, 0, 1000)?;
        for broker in self
            .kafka
            .brokers
            .split(',')
            .filter(|_| !self.kafka.brokers.trim().is_empty())
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
        TopicTemplate::parse(&self.kafka.topic)
            .map_err(|e| ConfigError::new("kafka.topic", e.to_string()))?;
        for (table, template) in &self.kafka.table_topics {
            TopicTemplate::parse(template).map_err(|e| {
                ConfigError::new(format!("kafka.table_topics.{table}"), e.to_string())
            })?;
        }
        match self.kafka.compression.as_str() {
            "none" | "gzip" | "snappy" | "lz4" | "zstd" => {}
            other => {
                return Err(ConfigError::new(
                    "kafka.compression",
                    format!("{other:?} is not one of none, gzip, snappy, lz4, zstd"),
                ))
            }
        }
        range("kafka.linger_ms", self.kafka.linger_ms, 0, 900_000)?;
        range(
            "kafka.message_max_bytes",
            self.kafka.message_max_bytes as u64,
            1000,
            1_000_000_000,
        )?;
        range(
            "kafka.max_in_flight_events",
            self.kafka.max_in_flight_events as u64,
            1,
            10_000_000,
        )?;
        range(
            "kafka.max_in_flight_bytes",
            self.kafka.max_in_flight_bytes as u64,
            1024,
            1 << 34,
        )?;
        for key in self.kafka.properties.keys() {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                return Err(ConfigError::new(
                    format!("kafka.properties.{key}"),
                    "is set by pgoutbox for delivery guarantees and cannot be overridden",
                ));
            }
        }
        if self.kafka.sasl_password_file.is_some() {
            if self.kafka.properties.contains_key("sasl.password") {
                return Err(ConfigError::new(
                    "kafka.sasl_password_file",
                    "cannot be combined with kafka.properties.\"sasl.password\" or KAFKA_SASL_PASSWORD; set one of them",
                ));
            }
            let protocol = self
                .kafka
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
        self.metrics.validate()?;
        self.partitions.validate()?;
        match self.log.format.as_str() {
            "text" | "json" => {}
            other => {
                return Err(ConfigError::new(
                    "log.format",
                    format!("{other:?} is not text or json"),
                ))
            }
        }
        Ok(())
    }

    /// Checks what only `run` needs: the Kafka brokers (`migrate` and `dle`
    /// never connect to Kafka).
    pub fn require_kafka(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::new(
                "kafka.brokers",
                "is required: set KAFKA_BROKERS or kafka.brokers (host:port[,host:port])",
            ));
        }
        Ok(())
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
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn valid() -> Config {
        let mut c = Config::default();
        c.apply_env(env(&[
            ("DATABASE_URL", "postgres://u:secret@127.0.0.1:5432/db"),
            ("KAFKA_BROKERS", "127.0.0.1:9092"),
        ]))
        .unwrap();
        c
    }

    #[test]
    fn defaults_with_required_env_validate() {
        valid().validate().unwrap();
    }

    #[test]
    fn seed_environment_variables_apply() {
        let mut c = valid();
        c.apply_env(env(&[
            ("OUTBOX_BATCH_SIZE", "250"),
            ("OUTBOX_LEASE_SECONDS", "45"),
            ("OUTBOX_POLL_INTERVAL_MS", "200"),
            ("OUTBOX_MAX_RETRIES", "7"),
            ("OUTBOX_MARK_COMPLETED", "false"),
        ]))
        .unwrap();
        assert_eq!(c.outbox.batch_size, 250);
        assert_eq!(c.outbox.lease_seconds, 45);
        assert_eq!(c.outbox.poll_interval_ms, 200);
        assert_eq!(c.outbox.max_retries, 7);
        assert!(!c.outbox.mark_completed);
    }

    #[test]
    fn worker_threads_default_to_one_and_are_checked() {
        let mut c = valid();
        assert_eq!(c.runtime.worker_threads, 1);
        c.apply_env(env(&[("OUTBOX_WORKER_THREADS", "4")])).unwrap();
        assert_eq!(c.runtime.worker_threads, 4);
        c.validate().unwrap();
        let e = c
            .apply_env(env(&[("OUTBOX_WORKER_THREADS", "many")]))
            .unwrap_err();
        assert_eq!(e.field, "OUTBOX_WORKER_THREADS");
        let mut c = valid();
        c.runtime = Config::from_toml("[runtime]\nworker_threads = 0\n")
            .unwrap()
            .runtime;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "runtime.worker_threads");
        assert!(e.problem.contains("1..=256"), "{}", e.problem);
    }

    #[test]
    fn mark_linger_is_bounded() {
        let mut c = valid();
        assert_eq!(c.cdc.mark_linger_ms, 20);
        c.cdc = Config::from_toml("[cdc]\nmark_linger_ms = 0\n")
            .unwrap()
            .cdc;
        c.validate().unwrap();
        c.cdc.mark_linger_ms = 5000;
        assert_eq!(c.validate().unwrap_err().field, "cdc.mark_linger_ms");
    }

    #[test]
    fn enable_audit_is_the_seeds_flag_and_unset_leaves_the_audit_alone() {
        let mut c = valid();
        assert_eq!(c.outbox.audit, None);
        c.apply_env(env(&[("ENABLE_AUDIT", "true")])).unwrap();
        assert_eq!(c.outbox.audit, Some(true));
        let c = Config::from_toml("[outbox]\naudit = false\n").unwrap();
        assert_eq!(c.outbox.audit, Some(false));
        let mut c = valid();
        let e = c.apply_env(env(&[("ENABLE_AUDIT", "maybe")])).unwrap_err();
        assert_eq!(e.field, "ENABLE_AUDIT");
    }

    #[test]
    fn bad_env_number_names_the_variable() {
        let mut c = valid();
        let e = c
            .apply_env(env(&[("OUTBOX_BATCH_SIZE", "many")]))
            .unwrap_err();
        assert_eq!(e.field, "OUTBOX_BATCH_SIZE");
        assert!(e.to_string().contains("\"many\""));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let e = Config::from_toml("[kafka]\nbrokers = \"a:1\"\nlinger = 5\n").unwrap_err();
        assert!(e.to_string().contains("linger"), "{e}");
        assert!(e.field.contains("line 3"), "{e}");
    }

    #[test]
    fn out_of_range_values_name_field_and_range() {
        let mut c = valid();
        c.outbox.batch_size = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "outbox.batch_size");
        assert!(e.problem.contains("1..=100000"));
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
    fn a_table_name_too_long_for_the_audit_names_is_refused() {
        check_audit_names(&"t".repeat(47)).unwrap();
        let e = check_audit_names(&"t".repeat(48)).unwrap_err();
        assert_eq!(e.field, "outbox.audit");
        assert!(e.problem.contains("at most 47"), "{e}");
    }

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
    fn debug_output_never_shows_the_password() {
        let c = valid();
        let text = format!("{c:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("127.0.0.1"));
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
    fn database_tls_keys_come_from_toml_and_env() {
        let mut c =
            Config::from_toml("[database]\ntls_mode = \"verify-ca\"\ntls_root_cert = \"system\"\n")
                .unwrap();
        assert_eq!(c.database.tls_mode, Some(TlsMode::VerifyCa));
        c.apply_env(env(&[("DATABASE_TLS_MODE", "verify-full")]))
            .unwrap();
        assert_eq!(c.database.tls_mode, Some(TlsMode::VerifyFull));
        let e = c
            .apply_env(env(&[("DATABASE_TLS_MODE", "on")]))
            .unwrap_err();
        assert_eq!(e.field, "DATABASE_TLS_MODE");
        let e = Config::from_toml("[database]\ntls_mode = \"verify_full\"\n").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn a_url_with_libpq_tls_parameters_validates() {
        let mut c = valid();
        c.database.url = DatabaseUrl::new(
            "postgres://u:secret@db.example.com/db?sslmode=verify-full&sslrootcert=system",
        );
        c.validate().unwrap();
        c.database.url = DatabaseUrl::new(
            "postgres://u:secret@h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem",
        );
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "sslrootcert in database.url");
        assert!(!e.to_string().contains("secret"));
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
    }
}

//! Environment variables over the file's values: [`ENV_VARS`] lists them
//! in the order [`Config::apply_env`] applies them; an empty variable counts
//! as unset.

use std::str::FromStr;

use super::{
    CdcConfig, Config, ConfigError, DatabaseConfig, DatabaseUrl, KafkaConfig, OutboxConfig,
    PollConfig, PollOrdering,
};

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
    "OUTBOX_TABLE_PRESET",
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
    "OUTBOX_ON_SLOT_LOST",
    "OUTBOX_FAILOVER_SLOT",
    "OUTBOX_MARK_WITH",
    "OUTBOX_SLOT",
    "OUTBOX_PUBLICATION",
    "OUTBOX_TOPIC",
    "OUTBOX_MESSAGES",
    "OUTBOX_MESSAGE_PREFIX",
    "OUTBOX_MESSAGE_PREFIXES",
    "KAFKA_BROKERS",
    "KAFKA_COMPRESSION",
    "KAFKA_LINGER_MS",
    "KAFKA_MAX_IN_FLIGHT_EVENTS",
    "KAFKA_MAX_IN_FLIGHT_BYTES",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SASL_PASSWORD_FILE",
    "OUTBOX_METADATA_HEADERS",
    "OUTBOX_RECORD_FORMAT",
    "OUTBOX_DELIVERY",
    "KAFKA_TRANSACTIONAL_ID",
    "KAFKA_PROGRESS_TOPIC",
    "KAFKA_TRANSACTION_MAX_EVENTS",
    "KAFKA_TRANSACTION_INTERVAL_MS",
    "OUTBOX_METRICS_LISTEN",
    "OUTBOX_HEALTH_OLDEST_PENDING_S",
    "OUTBOX_HEALTH_SLOT_LAG_BYTES",
    "OUTBOX_HEALTH_DEAD_LETTERS",
    "OUTBOX_HEALTH_DEAD_LETTER_WINDOW_S",
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
    /// Applies environment variables (looked up through `get`) over the
    /// current values.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        apply_database(&mut self.database, &get)?;
        apply_outbox(&mut self.outbox, &get)?;
        if let Some(v) = get("OUTBOX_MODE") {
            self.mode = v
                .trim()
                .parse()
                .map_err(|e: String| ConfigError::new("OUTBOX_MODE", e))?;
        }
        apply_poll(&mut self.poll, &get)?;
        // `OUTBOX_TOPIC` sits among the CDC variables, as in `ENV_VARS`.
        apply_cdc(&mut self.cdc, &mut self.kafka, &get)?;
        apply_kafka(&mut self.kafka, &get)?;
        if let Some(v) = get("OUTBOX_METRICS_LISTEN") {
            self.metrics.listen = v;
        }
        let health = &mut self.health;
        for (name, levels) in [
            (
                "OUTBOX_HEALTH_OLDEST_PENDING_S",
                &mut health.oldest_pending_s,
            ),
            ("OUTBOX_HEALTH_SLOT_LAG_BYTES", &mut health.slot_lag_bytes),
            ("OUTBOX_HEALTH_DEAD_LETTERS", &mut health.dead_letters),
        ] {
            if let Some(v) = get(name) {
                *levels = super::health::parse_levels(name, &v)?;
            }
        }
        if let Some(v) = get("OUTBOX_HEALTH_DEAD_LETTER_WINDOW_S") {
            health.dead_letter_window_s = parse_env(
                "OUTBOX_HEALTH_DEAD_LETTER_WINDOW_S",
                &v,
                "a whole number of seconds",
            )?;
        }
        if let Some(v) = get("OUTBOX_WORKER_THREADS") {
            self.runtime.worker_threads = parse_env("OUTBOX_WORKER_THREADS", &v, "a whole number")?;
        }
        Ok(())
    }
}

/// `DATABASE_*`.
fn apply_database(
    database: &mut DatabaseConfig,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = get("DATABASE_URL") {
        database.url = DatabaseUrl::new(v);
    }
    if let Some(v) = get("DATABASE_PASSWORD_FILE") {
        database.password_file = Some(v);
    }
    if let Some(v) = get("DATABASE_TLS_MODE") {
        database.tls_mode = Some(
            v.parse()
                .map_err(|e: String| ConfigError::new("DATABASE_TLS_MODE", e))?,
        );
    }
    if let Some(v) = get("DATABASE_TLS_ROOT_CERT") {
        database.tls_root_cert = Some(v);
    }
    if let Some(v) = get("DATABASE_TLS_CLIENT_CERT") {
        database.tls_client_cert = Some(v);
    }
    if let Some(v) = get("DATABASE_TLS_CLIENT_KEY") {
        database.tls_client_key = Some(v);
    }
    Ok(())
}

/// The seed's `OUTBOX_*` variables, `OUTBOX_MARK_COMPLETED` and
/// `ENABLE_AUDIT`.
fn apply_outbox(
    outbox: &mut OutboxConfig,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = get("OUTBOX_SCHEMA") {
        outbox.schema = v;
    }
    if let Some(v) = get("OUTBOX_TABLE") {
        outbox.table = v;
    }
    if let Some(v) = get("OUTBOX_TABLE_PRESET") {
        outbox.columns.preset = v
            .trim()
            .parse()
            .map_err(|e: String| ConfigError::new("OUTBOX_TABLE_PRESET", e))?;
    }
    if let Some(v) = get("OUTBOX_BATCH_SIZE") {
        outbox.batch_size = parse_env("OUTBOX_BATCH_SIZE", &v, "a whole number")?;
    }
    if let Some(v) = get("OUTBOX_LEASE_SECONDS") {
        outbox.lease_seconds = parse_env("OUTBOX_LEASE_SECONDS", &v, "a whole number")?;
    }
    if let Some(v) = get("OUTBOX_POLL_INTERVAL_MS") {
        outbox.poll_interval_ms = parse_env("OUTBOX_POLL_INTERVAL_MS", &v, "a whole number")?;
    }
    if let Some(v) = get("OUTBOX_MAX_RETRIES") {
        outbox.max_retries = parse_env("OUTBOX_MAX_RETRIES", &v, "a whole number")?;
    }
    if let Some(v) = get("OUTBOX_MARK_COMPLETED") {
        outbox.mark_completed = parse_bool("OUTBOX_MARK_COMPLETED", &v)?;
    }
    if let Some(v) = get("ENABLE_AUDIT") {
        outbox.audit = Some(parse_bool("ENABLE_AUDIT", &v)?);
    }
    Ok(())
}

/// `OUTBOX_CONCURRENCY`, `OUTBOX_ORDERING`, `OUTBOX_NOTIFY`.
fn apply_poll(
    poll: &mut PollConfig,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = get("OUTBOX_CONCURRENCY") {
        poll.concurrency = parse_env("OUTBOX_CONCURRENCY", &v, "a whole number")?;
    }
    if let Some(v) = get("OUTBOX_ORDERING") {
        poll.ordering = match v.trim() {
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
        poll.notify = parse_bool("OUTBOX_NOTIFY", &v)?;
    }
    Ok(())
}

/// The CDC variables, and `OUTBOX_TOPIC` (for `kafka.topic`) in its place
/// among them.
fn apply_cdc(
    cdc: &mut CdcConfig,
    kafka: &mut KafkaConfig,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = get("OUTBOX_FALLBACK_TO_POLL") {
        cdc.fallback_to_poll = parse_bool("OUTBOX_FALLBACK_TO_POLL", &v)?;
    }
    if let Some(v) = get("OUTBOX_ON_SLOT_LOST") {
        cdc.on_slot_lost = Some(
            v.trim()
                .parse()
                .map_err(|e: String| ConfigError::new("OUTBOX_ON_SLOT_LOST", e))?,
        );
    }
    if let Some(v) = get("OUTBOX_FAILOVER_SLOT") {
        cdc.failover_slot = Some(parse_bool("OUTBOX_FAILOVER_SLOT", &v)?);
    }
    if let Some(v) = get("OUTBOX_MARK_WITH") {
        cdc.mark_with = v
            .trim()
            .parse()
            .map_err(|e: String| ConfigError::new("OUTBOX_MARK_WITH", e))?;
    }
    if let Some(v) = get("OUTBOX_SLOT") {
        cdc.slot = v;
    }
    if let Some(v) = get("OUTBOX_PUBLICATION") {
        cdc.publication = v;
    }
    if let Some(v) = get("OUTBOX_TOPIC") {
        kafka.topic = v;
    }
    if let Some(v) = get("OUTBOX_MESSAGES") {
        cdc.messages = parse_bool("OUTBOX_MESSAGES", &v)?;
    }
    if let Some(v) = get("OUTBOX_MESSAGE_PREFIX") {
        cdc.message_prefix = v;
    }
    if let Some(v) = get("OUTBOX_MESSAGE_PREFIXES") {
        cdc.message_prefixes = v
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
    }
    Ok(())
}

/// `KAFKA_*`.
fn apply_kafka(
    kafka: &mut KafkaConfig,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    if let Some(v) = get("KAFKA_BROKERS") {
        kafka.brokers = v;
    }
    if let Some(v) = get("KAFKA_COMPRESSION") {
        kafka.compression = v;
    }
    if let Some(v) = get("KAFKA_LINGER_MS") {
        kafka.linger_ms = parse_env("KAFKA_LINGER_MS", &v, "a whole number")?;
    }
    if let Some(v) = get("KAFKA_MAX_IN_FLIGHT_EVENTS") {
        kafka.max_in_flight_events = Some(parse_env(
            "KAFKA_MAX_IN_FLIGHT_EVENTS",
            &v,
            "a whole number",
        )?);
    }
    if let Some(v) = get("KAFKA_MAX_IN_FLIGHT_BYTES") {
        kafka.max_in_flight_bytes = parse_env("KAFKA_MAX_IN_FLIGHT_BYTES", &v, "a whole number")?;
    }
    if let Some(v) = get("KAFKA_SASL_PASSWORD") {
        kafka.properties.insert("sasl.password".into(), v);
    }
    if let Some(v) = get("KAFKA_SASL_PASSWORD_FILE") {
        kafka.sasl_password_file = Some(v);
    }
    if let Some(v) = get("OUTBOX_METADATA_HEADERS") {
        kafka.metadata_headers = v
            .parse()
            .map_err(|e: String| ConfigError::new("OUTBOX_METADATA_HEADERS", e))?;
    }
    if let Some(v) = get("OUTBOX_RECORD_FORMAT") {
        kafka.format = v
            .trim()
            .parse()
            .map_err(|e: String| ConfigError::new("OUTBOX_RECORD_FORMAT", e))?;
    }
    if let Some(v) = get("OUTBOX_DELIVERY") {
        kafka.delivery = v
            .parse()
            .map_err(|e: String| ConfigError::new("OUTBOX_DELIVERY", e))?;
    }
    if let Some(v) = get("KAFKA_TRANSACTIONAL_ID") {
        kafka.transactional_id = Some(v);
    }
    if let Some(v) = get("KAFKA_PROGRESS_TOPIC") {
        kafka.progress_topic = v;
    }
    if let Some(v) = get("KAFKA_TRANSACTION_MAX_EVENTS") {
        kafka.transaction_max_events =
            parse_env("KAFKA_TRANSACTION_MAX_EVENTS", &v, "a whole number")?;
    }
    if let Some(v) = get("KAFKA_TRANSACTION_INTERVAL_MS") {
        kafka.transaction_interval_ms =
            parse_env("KAFKA_TRANSACTION_INTERVAL_MS", &v, "a whole number")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::super::test_support::{env, valid};
    use super::super::Config;
    use super::*;

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
    fn the_in_flight_window_is_set_from_the_environment() {
        let mut c = valid();
        c.apply_env(env(&[
            ("KAFKA_MAX_IN_FLIGHT_EVENTS", "20000"),
            ("KAFKA_MAX_IN_FLIGHT_BYTES", "1048576"),
        ]))
        .unwrap();
        assert_eq!(c.kafka.max_in_flight_events, Some(20_000));
        assert_eq!(c.kafka.max_in_flight_bytes, 1 << 20);
        let e = c
            .apply_env(env(&[("KAFKA_MAX_IN_FLIGHT_EVENTS", "10k")]))
            .unwrap_err();
        assert_eq!(e.field, "KAFKA_MAX_IN_FLIGHT_EVENTS");
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
    fn mark_with_is_read_and_a_bad_value_says_what_to_use() {
        let mut c = valid();
        assert_eq!(c.cdc.mark_with, crate::config::MarkWith::Journal);
        c.apply_env(env(&[("OUTBOX_MARK_WITH", " update ")]))
            .unwrap();
        assert_eq!(c.cdc.mark_with, crate::config::MarkWith::Update);
        let e = c
            .apply_env(env(&[("OUTBOX_MARK_WITH", "rows")]))
            .unwrap_err();
        assert_eq!(e.field, "OUTBOX_MARK_WITH");
        assert!(e.to_string().contains("\"journal\" or \"update\""), "{e}");
    }

    #[test]
    fn every_variable_is_read_in_the_listed_order() {
        let asked = RefCell::new(Vec::new());
        Config::default()
            .apply_env(|k| {
                asked.borrow_mut().push(k.to_owned());
                None
            })
            .unwrap();
        assert_eq!(asked.into_inner(), ENV_VARS);
    }
}

//! `kafka.delivery`: at least once (the default) or exactly once for
//! `read_committed` consumers, and the Kafka transactions exactly-once
//! delivery runs in (docs/exactly-once.md; ARCHITECTURE.md, invariant 13).

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use super::{range, ConfigError, KafkaConfig, Mode};

/// What a consumer of the topics may rely on.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// Every event at least once; after a crash the unconfirmed tail is
    /// sent again (consumers deduplicate on the event id).
    #[default]
    AtLeastOnce,
    /// Every event exactly once for `isolation.level=read_committed`
    /// consumers: events go out in Kafka transactions with the stream's
    /// position beside them, and a replay skips what Kafka already has.
    ExactlyOnce,
}

impl Delivery {
    /// The name used in config, env and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }
    }
}

impl fmt::Display for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Delivery {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "at-least-once" => Ok(Delivery::AtLeastOnce),
            "exactly-once" => Ok(Delivery::ExactlyOnce),
            other => Err(format!(
                "{other:?} is not a delivery guarantee; expected \"at-least-once\" or \"exactly-once\""
            )),
        }
    }
}

impl KafkaConfig {
    /// Checks the transaction settings (whatever the delivery, so that a
    /// switch to exactly-once meets no surprise).
    pub(super) fn validate_delivery(&self) -> Result<(), ConfigError> {
        // A transaction larger than the in-flight window is not an error:
        // its events stay in the window until it commits, so a full window
        // commits it early (the window is the effective limit).
        range(
            "kafka.transaction_max_events",
            self.transaction_max_events as u64,
            1,
            10_000_000,
        )?;
        range(
            "kafka.transaction_interval_ms",
            self.transaction_interval_ms,
            1,
            60_000,
        )?;
        range(
            "kafka.transaction_timeout_ms",
            self.transaction_timeout_ms,
            1_000,
            3_600_000,
        )?;
        if self.delivery == Delivery::ExactlyOnce
            && self.transaction_timeout_ms <= self.transaction_interval_ms
        {
            return Err(ConfigError::new(
                "kafka.transaction_timeout_ms",
                format!(
                    "{} must be longer than kafka.transaction_interval_ms ({}): a transaction is committed after that interval and must not time out before",
                    self.transaction_timeout_ms, self.transaction_interval_ms
                ),
            ));
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if self.progress_topic.is_empty()
            || self.progress_topic.len() > 249
            || !self.progress_topic.chars().all(legal)
            || self.progress_topic == "."
            || self.progress_topic == ".."
        {
            return Err(ConfigError::new(
                "kafka.progress_topic",
                format!(
                    "{:?} is not a legal Kafka topic name (1–249 of a-z A-Z 0-9 . _ -)",
                    self.progress_topic
                ),
            ));
        }
        if let Some(id) = &self.transactional_id {
            if id.trim().is_empty() {
                return Err(ConfigError::new(
                    "kafka.transactional_id",
                    "is empty; leave it unset to derive it from the database and the slot",
                ));
            }
        }
        Ok(())
    }

    /// Checks that the delivery guarantee fits the mode the relay runs in.
    pub(super) fn require_delivery_mode(&self, mode: Mode) -> Result<(), ConfigError> {
        if self.delivery == Delivery::ExactlyOnce && mode != Mode::Cdc {
            return Err(ConfigError::new(
                "kafka.delivery",
                format!(
                    "exactly-once needs mode = \"cdc\" (this run's mode is {mode}): only the replication stream gives every event a position that Kafka can record in the same transaction; run with --mode cdc, or set kafka.delivery = \"at-least-once\" (OUTBOX_DELIVERY) for poll mode"
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{env, valid};
    use super::*;

    #[test]
    fn delivery_parses_from_env_and_toml_and_names_the_choices() {
        let mut c = valid();
        assert_eq!(c.kafka.delivery, Delivery::AtLeastOnce);
        c.apply_env(env(&[("OUTBOX_DELIVERY", "exactly-once")]))
            .unwrap();
        assert_eq!(c.kafka.delivery, Delivery::ExactlyOnce);
        let e = c
            .apply_env(env(&[("OUTBOX_DELIVERY", "exactly_once")]))
            .unwrap_err();
        assert!(e.to_string().contains("\"at-least-once\""), "{e}");
        let c = super::super::Config::from_toml(
            "[kafka]\ndelivery = \"exactly-once\"\ntransaction_max_events = 500\n",
        )
        .unwrap();
        assert_eq!(c.kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(c.kafka.transaction_max_events, 500);
    }

    #[test]
    fn exactly_once_is_refused_outside_cdc_mode_saying_why() {
        let mut c = valid();
        c.kafka.delivery = Delivery::ExactlyOnce;
        c.require_kafka().unwrap();
        for mode in [Mode::Poll, Mode::Auto] {
            c.mode = mode;
            let e = c.require_kafka().unwrap_err();
            assert_eq!(e.field, "kafka.delivery");
            assert!(e.problem.contains("--mode cdc"), "{e}");
        }
        c.kafka.delivery = Delivery::AtLeastOnce;
        c.require_kafka().unwrap();
    }

    #[test]
    fn exactly_once_needs_marking() {
        let mut c = valid();
        c.kafka.delivery = Delivery::ExactlyOnce;
        c.outbox.mark_completed = false;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "kafka.delivery");
        assert!(e.problem.contains("mark_completed"), "{e}");
    }

    #[test]
    fn falling_back_to_polling_is_refused_with_exactly_once() {
        let mut c = valid();
        c.kafka.delivery = Delivery::ExactlyOnce;
        c.cdc.on_slot_lost = Some(crate::config::SlotLostPolicy::Poll);
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "cdc.on_slot_lost");
        assert!(e.problem.contains("at least once"), "{e}");
    }

    #[test]
    fn the_window_defaults_by_delivery_and_a_setting_wins() {
        let mut c = valid();
        assert_eq!(c.kafka.window_events(), crate::config::WINDOW_EVENTS);
        c.kafka.delivery = Delivery::ExactlyOnce;
        assert_eq!(
            c.kafka.window_events(),
            crate::config::WINDOW_EVENTS_EXACTLY_ONCE
        );
        assert!(crate::config::WINDOW_EVENTS_EXACTLY_ONCE > c.kafka.transaction_max_events);
        c.kafka.max_in_flight_events = Some(5_000);
        assert_eq!(c.kafka.window_events(), 5_000);
        c.kafka.max_in_flight_events = Some(0);
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.max_in_flight_events"
        );
    }

    #[test]
    fn transaction_settings_are_checked() {
        let mut c = valid();
        c.kafka.transaction_max_events = 0;
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.transaction_max_events"
        );
        // A small in-flight window with the default transaction size is
        // fine, in either delivery (the window then bounds transactions).
        for delivery in [Delivery::AtLeastOnce, Delivery::ExactlyOnce] {
            let mut c = valid();
            c.kafka.delivery = delivery;
            c.kafka.max_in_flight_events = Some(100);
            c.validate().unwrap();
        }
        let mut c = valid();
        c.kafka.transaction_timeout_ms = 1_000;
        c.kafka.transaction_interval_ms = 2_000;
        c.validate().unwrap();
        c.kafka.delivery = Delivery::ExactlyOnce;
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.transaction_timeout_ms"
        );
        let mut c = valid();
        c.kafka.progress_topic = "bad topic".into();
        assert_eq!(c.validate().unwrap_err().field, "kafka.progress_topic");
        let mut c = valid();
        c.kafka
            .properties
            .insert("transactional.id".into(), "x".into());
        assert_eq!(
            c.validate().unwrap_err().field,
            "kafka.properties.transactional.id"
        );
    }
}

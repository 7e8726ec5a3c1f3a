//! What `pgoutbox status` shows of exactly-once delivery: the last position
//! a committed Kafka transaction recorded for this stream in the progress
//! topic (docs/exactly-once.md).

use serde::Serialize;

use crate::config::{Config, Delivery};
use crate::pipeline::ProgressRecord;

/// The delivery guarantee and, for exactly-once, what Kafka holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeliveryOverview {
    /// `at-least-once` or `exactly-once`.
    pub guarantee: String,
    /// Exactly-once: the progress topic.
    pub progress_topic: Option<String>,
    /// Exactly-once: the key of this stream's record (the
    /// `transactional.id`), when a record was found.
    pub key: Option<String>,
    /// Exactly-once: the last committed record of this stream.
    pub committed: Option<ProgressRecord>,
    /// Exactly-once: why the progress topic could not be read.
    pub error: Option<String>,
}

/// Reads this stream's last progress record (blocking on Kafka; run it off
/// the async threads): the record under `kafka.transactional_id` when one
/// is configured, else the one written for this cluster (its system
/// identifier, when the caller could read it), database and slot.
pub fn read(config: &Config, database: &str, system_identifier: Option<&str>) -> DeliveryOverview {
    let kafka = &config.kafka;
    let mut out = DeliveryOverview {
        guarantee: kafka.delivery.as_str().to_owned(),
        ..DeliveryOverview::default()
    };
    if kafka.delivery != Delivery::ExactlyOnce {
        return out;
    }
    out.progress_topic = Some(kafka.progress_topic.clone());
    let records = match crate::sink::transaction::read_progress_topic(
        kafka,
        kafka.transactional_id.as_deref(),
    ) {
        Ok(r) => r,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    let mut records: Vec<_> = records.into_iter().collect();
    records.sort();
    let mine = records.into_iter().find_map(|(key, value)| {
        let record = ProgressRecord::parse(&value?).ok()?;
        let ours = kafka.transactional_id.is_some()
            || (record.slot == config.cdc.slot
                && record.database == database
                && system_identifier.is_none_or(|id| id == record.system_identifier));
        ours.then(|| (String::from_utf8_lossy(&key).into_owned(), record))
    });
    if let Some((key, record)) = mine {
        out.key = Some(key);
        out.committed = Some(record);
    }
    out
}

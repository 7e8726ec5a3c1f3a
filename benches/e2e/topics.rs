//! The Kafka side of the benchmark: a fresh topic per run (created ahead, so
//! creating it is not timed; broker log-append timestamps, so latency is
//! measured to the moment the broker wrote the record), the finish line of a
//! drain (the topic's end offsets, not a consumer's guess), and the
//! commit-to-log-append latencies of a live run.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::outbox::BoxError;

/// Clients of the benchmark's broker.
pub struct Kafka {
    brokers: String,
    admin: AdminClient<DefaultClientContext>,
    offsets: BaseConsumer,
    /// Partitions of every benchmark topic.
    pub partitions: i32,
}

impl Kafka {
    /// Connects to `brokers`.
    pub fn new(brokers: &str, partitions: i32) -> Result<Kafka, BoxError> {
        let admin = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let offsets = consumer_config(brokers).create()?;
        Ok(Kafka {
            brokers: brokers.to_string(),
            admin,
            offsets,
            partitions,
        })
    }

    /// Creates `topic` with log-append timestamps and waits until every
    /// partition has a leader.
    pub async fn create_topic(&self, topic: &str) -> Result<(), BoxError> {
        let new = NewTopic::new(topic, self.partitions, TopicReplication::Fixed(1))
            .set("message.timestamp.type", "LogAppendTime");
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in self.admin.create_topics([&new], &opts).await? {
            r.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // Ask for the topic's metadata by name: librdkafka otherwise
            // may keep answering from a cache that predates the topic.
            let why = match self.leaders(topic) {
                Ok(()) => match self.end_offsets(topic) {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e,
            };
            if std::time::Instant::now() > deadline {
                return Err(
                    format!("topic {topic} has no leaders 60 s after its creation: {why}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ok when every partition of `topic` has a leader, per a metadata
    /// request for that topic.
    fn leaders(&self, topic: &str) -> Result<(), String> {
        let metadata = tokio::task::block_in_place(|| {
            self.offsets
                .fetch_metadata(Some(topic), Duration::from_secs(5))
        })
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| format!("metadata of {topic}: topic not listed"))?;
        if let Some(e) = t.error() {
            return Err(format!("metadata of {topic}: {e:?}"));
        }
        let led = t.partitions().iter().filter(|p| p.leader() >= 0).count();
        if led < self.partitions as usize {
            return Err(format!(
                "{led} of {} partitions have a leader",
                self.partitions
            ));
        }
        Ok(())
    }

    /// Deletes `topic` (a drain of 1,000,000 events leaves ~0.5 GiB of log;
    /// a full run would otherwise fill a small disk).
    pub async fn delete_topic(&self, topic: &str) -> Result<(), BoxError> {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in self.admin.delete_topics(&[topic], &opts).await? {
            r.map_err(|(t, e)| format!("deleting topic {t}: {e}"))?;
        }
        Ok(())
    }

    /// Deletes the topics earlier runs left behind (names starting with
    /// `prefix`); returns how many.
    pub async fn delete_leftovers(&self, prefix: &str) -> Result<usize, BoxError> {
        let metadata = tokio::task::block_in_place(|| {
            self.offsets.fetch_metadata(None, Duration::from_secs(10))
        })?;
        let names: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(prefix))
            .collect();
        for name in &names {
            self.delete_topic(name).await?;
        }
        Ok(names.len())
    }

    /// The sum of `topic`'s high watermarks: how many records the broker
    /// holds (every benchmark topic starts empty).
    pub fn end_offsets(&self, topic: &str) -> Result<i64, BoxError> {
        let mut sum = 0;
        for p in 0..self.partitions {
            let (_, high) = tokio::task::block_in_place(|| {
                self.offsets
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
            })
            .map_err(|e| format!("end offsets of {topic}[{p}]: {e}"))?;
            sum += high;
        }
        Ok(sum)
    }

    /// Reads every record of `topic` and returns the latency of each
    /// distinct event whose `t_us` is at or after `since_us`: broker
    /// log-append time minus the insert's clock_timestamp, in milliseconds
    /// (the broker's timestamp has millisecond resolution), and how many
    /// records repeated an event already read.
    pub fn latencies(&self, topic: &str, since_us: i64) -> Result<(Vec<f64>, u64), BoxError> {
        let consumer: BaseConsumer = consumer_config(&self.brokers).create()?;
        let mut want = 0;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
            want += high;
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut seen = HashSet::new();
        let mut latencies = Vec::new();
        let mut duplicates = 0;
        let mut read = 0;
        let mut idle = 0;
        while read < want {
            match consumer.poll(Duration::from_secs(1)) {
                None => {
                    idle += 1;
                    if idle > 30 {
                        return Err(format!(
                            "{topic}: read {read} of {want} records, then nothing for 30 s"
                        )
                        .into());
                    }
                }
                Some(Err(e)) => return Err(format!("reading {topic}: {e}").into()),
                Some(Ok(m)) => {
                    idle = 0;
                    read += 1;
                    let Timestamp::LogAppendTime(ts_ms) = m.timestamp() else {
                        return Err(
                            format!("{topic}: a record without a log-append timestamp").into()
                        );
                    };
                    let event: Event = serde_json::from_slice(m.payload().unwrap_or_default())
                        .map_err(|e| {
                            format!("{topic}: a record whose value is not the bench payload: {e}")
                        })?;
                    if event.t_us < since_us {
                        continue;
                    }
                    if !seen.insert(event.order_id) {
                        duplicates += 1;
                        continue;
                    }
                    latencies.push(ts_ms as f64 - event.t_us as f64 / 1000.0);
                }
            }
        }
        Ok((latencies, duplicates))
    }
}

/// The fields of the bench payload the latency needs.
#[derive(Deserialize)]
struct Event {
    t_us: i64,
    order_id: String,
}

fn consumer_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", "pgoutbox-bench-e2e")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", "52428800");
    c
}

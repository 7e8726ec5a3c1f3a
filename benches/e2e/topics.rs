//! The Kafka side of the benchmark: a fresh topic per run (created ahead, so
//! creating it is not timed; broker log-append timestamps, so latency is
//! measured to the moment the broker wrote the record), the finish line of a
//! drain (the topic's end offsets, not a consumer's guess), and the
//! commit-to-log-append latencies of a live run.
//!
//! Every consumer here reads `isolation.level=read_committed` (librdkafka's
//! default, set explicitly): for the topics of transactional systems
//! (exactly-once) that is what a consumer relying on the guarantee reads,
//! and their end offsets are then the last stable offsets. For them a
//! drain's finish line is not a count of offsets (each commit's markers
//! take one per partition): see [`Kafka::committed`]. A live run's
//! consumer ([`Live`]) reads during the load and notes when each event
//! became visible to it — for a transactional topic that is the commit of
//! the Kafka transaction, later than the records' log-append time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Deserialize;

use crate::outbox::BoxError;

/// Clients of the benchmark's broker.
pub struct Kafka {
    brokers: String,
    admin: AdminClient<DefaultClientContext>,
    /// read_committed: its end offsets are the last stable offsets.
    offsets: BaseConsumer,
    /// read_uncommitted: its end offsets are the high watermarks.
    uncommitted: BaseConsumer,
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
        let uncommitted = consumer_config(brokers)
            .set("isolation.level", "read_uncommitted")
            .create()?;
        Ok(Kafka {
            brokers: brokers.to_string(),
            admin,
            offsets,
            uncommitted,
            partitions,
        })
    }

    /// Creates the progress topic of an exactly-once run ahead of it, as
    /// the relay would (compacted, one partition), so that its creation is
    /// not timed.
    pub async fn create_progress_topic(&self, topic: &str) -> Result<(), BoxError> {
        let new =
            NewTopic::new(topic, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
        self.create_and_wait(new, 1).await
    }

    /// Creates `topic` with log-append timestamps and waits until every
    /// partition has a leader.
    pub async fn create_topic(&self, topic: &str) -> Result<(), BoxError> {
        let new = NewTopic::new(topic, self.partitions, TopicReplication::Fixed(1))
            .set("message.timestamp.type", "LogAppendTime");
        self.create_and_wait(new, self.partitions).await
    }

    /// Creates `new` and waits (up to 60 s) until each of its `partitions`
    /// has a leader and answers for its offsets.
    async fn create_and_wait(&self, new: NewTopic<'_>, partitions: i32) -> Result<(), BoxError> {
        let topic = new.name;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in self.admin.create_topics([&new], &opts).await? {
            r.map_err(|(t, e)| format!("creating topic {t}: {e}"))?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // Ask for the topic's metadata by name: librdkafka otherwise
            // may keep answering from a cache that predates the topic.
            let why = match self.leaders(topic, partitions) {
                Ok(()) => match tokio::task::block_in_place(|| {
                    (0..partitions).try_for_each(|p| {
                        self.offsets
                            .fetch_watermarks(topic, p, Duration::from_secs(5))
                            .map(|_| ())
                    })
                }) {
                    Ok(()) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e,
            };
            if std::time::Instant::now() > deadline {
                return Err(
                    format!("topic {topic} is not usable 60 s after its creation: {why}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ok when all `partitions` of `topic` have a leader, per a metadata
    /// request for that topic.
    fn leaders(&self, topic: &str, partitions: i32) -> Result<(), String> {
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
        if led < partitions as usize {
            return Err(format!("{led} of {partitions} partitions have a leader"));
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

    /// The sum of `topic`'s end offsets as a read_committed consumer sees
    /// them (the last stable offsets; the high watermarks where no
    /// transaction is open): how many records the broker holds (every
    /// benchmark topic starts empty) — for a topic without transactions.
    pub fn end_offsets(&self, topic: &str) -> Result<i64, BoxError> {
        Ok(self.partition_ends(topic, true)?.iter().sum())
    }

    /// Per partition of `topic`: its last stable offset (`committed`) or
    /// its high watermark.
    pub fn partition_ends(&self, topic: &str, committed: bool) -> Result<Vec<i64>, BoxError> {
        let client = if committed {
            &self.offsets
        } else {
            &self.uncommitted
        };
        let mut ends = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            let (_, high) = tokio::task::block_in_place(|| {
                client.fetch_watermarks(topic, p, Duration::from_secs(5))
            })
            .map_err(|e| format!("end offsets of {topic}[{p}]: {e}"))?;
            ends.push(high);
        }
        Ok(ends)
    }

    /// Reads `topic` read_committed to its end: how many records committed
    /// transactions hold, and per partition the offset of the last of them
    /// (-1: none). The offsets after it, up to the end offset, are
    /// transaction markers.
    pub fn committed(&self, topic: &str) -> Result<(u64, Vec<i64>), BoxError> {
        let consumer: BaseConsumer = consumer_config(&self.brokers)
            .set("enable.partition.eof", "true")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut last = vec![-1; self.partitions as usize];
        let mut at_end = vec![false; self.partitions as usize];
        let mut records = 0;
        let mut idle = 0;
        while at_end.iter().any(|e| !e) {
            match consumer.poll(Duration::from_secs(1)) {
                None => {
                    idle += 1;
                    if idle > 30 {
                        return Err(format!(
                            "{topic}: read {records} records, then nothing for 30 s"
                        )
                        .into());
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(e) = at_end.get_mut(p as usize) {
                        *e = true;
                    }
                }
                Some(Err(e)) => return Err(format!("reading {topic}: {e}").into()),
                Some(Ok(m)) => {
                    idle = 0;
                    records += 1;
                    if let Some(l) = last.get_mut(m.partition() as usize) {
                        *l = (*l).max(m.offset());
                    }
                }
            }
        }
        Ok((records, last))
    }

    /// Starts a read_committed consumer of `topic` (from its beginning) on a
    /// thread of its own, noting when each event became visible to it.
    pub fn live(&self, topic: &str) -> Result<Live, BoxError> {
        let consumer: BaseConsumer = consumer_config(&self.brokers).create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let distinct = Arc::new(AtomicU64::new(0));
        let (stop2, distinct2, topic) = (stop.clone(), distinct.clone(), topic.to_string());
        let thread = std::thread::spawn(move || {
            let mut seen = HashSet::new();
            let mut events = Vec::new();
            let mut duplicates = 0;
            while !stop2.load(Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(100)) {
                    None => {}
                    Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
                    Some(Ok(m)) => {
                        let seen_us = now_us();
                        let event: Event = serde_json::from_slice(m.payload().unwrap_or_default())
                            .map_err(|e| {
                                format!(
                                    "{topic}: a record whose value is not the bench payload: {e}"
                                )
                            })?;
                        if seen.insert(event.order_id) {
                            events.push((event.t_us, seen_us));
                            distinct2.fetch_add(1, Ordering::Relaxed);
                        } else {
                            duplicates += 1;
                        }
                    }
                }
            }
            Ok((events, duplicates))
        });
        Ok(Live {
            stop,
            distinct,
            thread,
        })
    }

    /// Reads every record of `topic` and returns the latency of each
    /// distinct event whose `t_us` is at or after `since_us`: broker
    /// log-append time minus the insert's clock_timestamp, in milliseconds
    /// (the broker's timestamp has millisecond resolution), and how many
    /// records repeated an event already read.
    pub fn latencies(&self, topic: &str, since_us: i64) -> Result<(Vec<f64>, u64), BoxError> {
        // To each partition's end (an end offset counts transaction markers
        // too, so it is not a number of records to wait for).
        let consumer: BaseConsumer = consumer_config(&self.brokers)
            .set("enable.partition.eof", "true")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut at_end = vec![false; self.partitions as usize];
        let mut seen = HashSet::new();
        let mut latencies = Vec::new();
        let mut duplicates = 0;
        let mut read = 0;
        let mut idle = 0;
        while at_end.iter().any(|e| !e) {
            match consumer.poll(Duration::from_secs(1)) {
                None => {
                    idle += 1;
                    if idle > 30 {
                        return Err(
                            format!("{topic}: read {read} records, then nothing for 30 s").into(),
                        );
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(e) = at_end.get_mut(p as usize) {
                        *e = true;
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

/// A read_committed consumer reading a live run's topic as it is written.
pub struct Live {
    stop: Arc<AtomicBool>,
    distinct: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Result<LiveRead, String>>,
}

/// What the live consumer read: (insert's t_us, when it had it) of each
/// distinct event, and how many records repeated one.
type LiveRead = (Vec<(i64, i64)>, u64);

impl Live {
    /// Distinct events seen so far.
    pub fn seen(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    /// Fails when the consumer stopped on an error.
    pub fn check(&self) -> Result<(), BoxError> {
        if self.thread.is_finished() && !self.stop.load(Ordering::Relaxed) {
            return Err("the live consumer stopped".into());
        }
        Ok(())
    }

    /// Stops it; returns, for each distinct event inserted at or after
    /// `since_us`, the milliseconds from its insert's clock_timestamp until
    /// this consumer had it, and how many records repeated an event.
    pub fn finish(self, since_us: i64) -> Result<(Vec<f64>, u64), BoxError> {
        self.stop.store(true, Ordering::Relaxed);
        let (events, duplicates) = self
            .thread
            .join()
            .map_err(|_| "the live consumer panicked")??;
        let latencies = events
            .into_iter()
            .filter(|(t_us, _)| *t_us >= since_us)
            .map(|(t_us, seen_us)| (seen_us - t_us) as f64 / 1000.0)
            .collect();
        Ok((latencies, duplicates))
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
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
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800");
    c
}

//! Kafka transactions for exactly-once delivery (docs/exactly-once.md):
//! the transactional producer's verbs, run off the async threads, and the
//! progress topic — created compacted or checked, read to its end with a
//! `read_committed` consumer at start.
//!
//! What librdkafka's transaction errors mean to the relay
//! ([`TxnFailure`]): a retriable error is retried until the transaction
//! timeout; one that requires an abort aborts, and the relay resumes from
//! the last committed position; a fenced producer (another relay with the
//! same `transactional.id` called `init_transactions`) stops serving and
//! stands by; any other fatal error stops the relay.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::kafka::{client_config, hide, PROGRESS_TICKET};
use super::Sink;
use crate::config::KafkaConfig;
use crate::pipeline::{CommitFuture, KafkaRecord, TxnFailure};

/// How long `init_transactions` may take (it waits for the previous
/// producer's open transaction to be aborted).
const INIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a librdkafka transaction error means to the relay.
fn failure(doing: &str, e: &KafkaError) -> TxnFailure {
    use RDKafkaErrorCode as C;
    let KafkaError::Transaction(r) = e else {
        return TxnFailure::Abort(format!("{doing}: {e}"));
    };
    let text = format!("{doing}: {} ({})", r.string(), r.name());
    match r.code() {
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch => TxnFailure::Fenced(text),
        C::UnsupportedVersion | C::UnsupportedFeature => TxnFailure::Fatal(format!(
            "{text}; the Kafka brokers do not support transactions (exactly-once delivery needs Kafka 0.11 or newer with the transaction state log); set kafka.delivery = \"at-least-once\" or upgrade the brokers"
        )),
        C::InvalidTransactionTimeout => TxnFailure::Fatal(format!(
            "{text}; kafka.transaction_timeout_ms is above the brokers' transaction.max.timeout.ms: lower it, or raise transaction.max.timeout.ms on the brokers"
        )),
        C::TransactionalIdAuthorizationFailed | C::ClusterAuthorizationFailed => {
            TxnFailure::Fatal(format!(
                "{text}; the relay's Kafka principal needs WRITE and DESCRIBE on the transactional id (and IDEMPOTENT_WRITE on the cluster)"
            ))
        }
        _ if r.is_fatal() => TxnFailure::Fatal(text),
        _ => TxnFailure::Abort(text),
    }
}

/// Runs a transaction verb, retrying retriable errors until `timeout`.
fn retrying(
    doing: &str,
    timeout: Duration,
    mut verb: impl FnMut(Duration) -> Result<(), KafkaError>,
) -> Result<(), TxnFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match verb(left.max(Duration::from_millis(100))) {
            Ok(()) => return Ok(()),
            Err(KafkaError::Transaction(r))
                if r.is_retriable() && !r.is_fatal() && Instant::now() < deadline =>
            {
                tracing::debug!(error = %r.string(), "{doing}: retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(failure(doing, &e)),
        }
    }
}

impl Sink {
    /// Registers the `transactional.id` with the brokers, fencing any
    /// earlier producer with the same id and aborting its open
    /// transaction. Needed once before the first transaction.
    pub async fn init_transactions(&self) -> Result<(), TxnFailure> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            retrying("initialising Kafka transactions", INIT_TIMEOUT, |t| {
                producer.init_transactions(t)
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(TxnFailure::Abort(format!(
                "initialising Kafka transactions: {e}"
            )))
        })
    }

    /// Opens a transaction (local to the producer) and enqueues `progress`
    /// in it: the progress partition is then registered with the
    /// transaction together with the first records' partitions (one
    /// `AddPartitionsToTxn` per transaction instead of a second one at
    /// commit, which the commit waited for). Its value is the position
    /// already committed, and the commit's own progress record comes later
    /// in the same transaction, so readers (the latest record per key)
    /// never see it alone. Not enqueued when the producer's queue is
    /// full: the commit's record registers the partition then.
    pub fn begin_transaction(&self, progress: KafkaRecord) -> Result<(), TxnFailure> {
        self.producer
            .begin_transaction()
            .map_err(|e| failure("beginning a Kafka transaction", &e))?;
        let record =
            rdkafka::producer::BaseRecord::with_opaque_to(&progress.topic, PROGRESS_TICKET)
                .key(&progress.key[..])
                .payload(&progress.value[..]);
        if let Err((e, _)) = self.producer.send(record) {
            tracing::debug!(error = %e, "progress record not sent at the transaction's start; the commit sends it");
        }
        Ok(())
    }

    /// Sends `progress` in the open transaction and commits it, off the
    /// async threads.
    pub fn commit_transaction(&self, progress: KafkaRecord) -> CommitFuture {
        let producer = self.producer.clone();
        let timeout = self.transaction_timeout;
        tokio::task::spawn_blocking(move || {
            // Blocks while the producer's queue is full, off the async
            // threads.
            let deadline = Instant::now() + timeout;
            loop {
                let record =
                    rdkafka::producer::BaseRecord::with_opaque_to(&progress.topic, PROGRESS_TICKET)
                        .key(&progress.key[..])
                        .payload(&progress.value[..]);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err((e, _)) => {
                        return Err(TxnFailure::Abort(format!(
                            "sending the progress record: {e}"
                        )))
                    }
                }
            }
            // rust-rdkafka's commit_transaction first flushes by polling
            // in 100 ms steps; with the ThreadedProducer's own thread
            // taking the delivery reports, each step sleeps its full
            // 100 ms, so every commit took 100 ms or more (BENCHMARKS.md,
            // "Why: every commit takes 100 ms"). librdkafka's flush waits
            // in steps of at most 10 ms: after it, nothing is in flight
            // and the commit goes straight to EndTxn.
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: the producer's live handle; rd_kafka_flush only waits
            // for the handle's queue to drain.
            unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), ms) };
            retrying("committing a Kafka transaction", timeout, |t| {
                producer.commit_transaction(t)
            })
        })
    }

    /// Aborts the open transaction, off the async threads.
    pub fn abort_transaction(&self) -> CommitFuture {
        let producer = self.producer.clone();
        let timeout = self.transaction_timeout;
        tokio::task::spawn_blocking(move || {
            retrying("aborting a Kafka transaction", timeout, |t| {
                producer.abort_transaction(t)
            })
        })
    }
}

/// Why the progress topic cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProgressTopicError {
    /// Kafka did not answer: try again later.
    #[error("{0}")]
    Unreachable(String),
    /// The topic or the brokers' settings are wrong: an operator must act.
    #[error("{0}")]
    Refused(String),
}

/// Creates the progress topic (compacted, one partition, replicated up to
/// three times) or checks the one that exists, and checks
/// `kafka.transaction_timeout_ms` against the brokers'
/// `transaction.max.timeout.ms`. Errors say what to change.
pub async fn prepare_progress_topic(cfg: &KafkaConfig) -> Result<(), ProgressTopicError> {
    use ProgressTopicError::Refused;
    let (client, secrets) = client_config(cfg).map_err(|e| Refused(e.to_string()))?;
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(|e| Refused(hide(format!("kafka admin client: {e}"), &secrets)))?;
    let prepared = prepare_with(&admin, cfg).await;
    let_go(admin);
    prepared
}

/// Drops a Kafka client on a thread of its own: closing one waits for its
/// polling thread's next wake-up, about 100 ms, which a session start (a
/// relay taking over, say) has no reason to wait for.
fn let_go<T: Send + 'static>(client: T) {
    std::thread::spawn(move || drop(client));
}

/// [`prepare_progress_topic`] with its admin client.
async fn prepare_with(
    admin: &AdminClient<DefaultClientContext>,
    cfg: &KafkaConfig,
) -> Result<(), ProgressTopicError> {
    use ProgressTopicError::{Refused, Unreachable};
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let topic = cfg.progress_topic.as_str();
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(|e| Unreachable(format!("reading the Kafka cluster's metadata: {e}")))?;
    let brokers: Vec<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none());
    if exists {
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await
            .map_err(|e| Unreachable(format!("describing the progress topic {topic:?}: {e}")))?;
        let config = match described.first() {
            Some(Ok(config)) => config,
            Some(Err(code)) => {
                return Err(Refused(format!(
                    "reading the configuration of the progress topic {topic:?}: {code}; the relay's Kafka principal needs DESCRIBE_CONFIGS on it"
                )))
            }
            None => {
                return Err(Unreachable(format!(
                    "the brokers returned no configuration for the progress topic {topic:?}"
                )))
            }
        };
        let policy = config
            .get("cleanup.policy")
            .and_then(|e| e.value.clone())
            .unwrap_or_default();
        if !policy.split(',').any(|p| p.trim() == "compact") {
            return Err(Refused(format!(
                "the progress topic {topic:?} exists but its cleanup.policy is {policy:?}, not \"compact\": records older than its retention would be deleted and a restart would send everything since again. Make it compacted (kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact) or set kafka.progress_topic to a new name"
            )));
        }
    } else {
        let replication = brokers.len().clamp(1, 3) as i32;
        // Compaction never touches the active segment: an hour-long
        // segment keeps the topic (read from its start at every session
        // start) small.
        let new = NewTopic::new(topic, 1, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "compact")
            .set("segment.ms", "3600000");
        let created = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| Unreachable(format!("creating the progress topic {topic:?}: {e}")))?;
        for r in created {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Refused(format!(
                        "creating the progress topic {topic:?}: {code}; create it yourself (compacted: cleanup.policy=compact) or grant the relay CREATE on it"
                    )))
                }
            }
        }
        tracing::info!(
            topic,
            replication,
            "created the progress topic (cleanup.policy=compact)"
        );
    }
    let Some(&broker) = brokers.first() else {
        return Err(Unreachable(
            "the Kafka cluster's metadata lists no broker".into(),
        ));
    };
    let described = admin
        .describe_configs([&ResourceSpecifier::Broker(broker)], &opts)
        .await
        .map_err(|e| Unreachable(format!("describing broker {broker}: {e}")))?;
    let max = described
        .first()
        .and_then(|r| r.as_ref().ok())
        .and_then(|r| r.get("transaction.max.timeout.ms"))
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse::<u64>().ok());
    if max.is_none() {
        tracing::warn!(broker, "could not read the broker's transaction.max.timeout.ms (the relay's principal may lack DESCRIBE_CONFIGS on the cluster): kafka.transaction_timeout_ms is not checked against it");
    }
    if let Some(max) = max {
        if cfg.transaction_timeout_ms > max {
            return Err(Refused(format!(
                "kafka.transaction_timeout_ms is {} but the brokers' transaction.max.timeout.ms is {max}: the brokers would refuse every transaction. Lower kafka.transaction_timeout_ms to at most {max}, or raise transaction.max.timeout.ms on the brokers",
                cfg.transaction_timeout_ms
            )));
        }
    }
    Ok(())
}

/// The progress reader's context: reaching a partition's end is how it
/// knows it has read everything, not an error to log.
struct Reader;

impl rdkafka::ClientContext for Reader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(error = %error, %reason, "kafka client error (progress topic reader)");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Reader {}

/// The latest committed value under `key` in the progress topic (`None`
/// when there is none, or the latest is a tombstone), read to the topic's
/// end with `isolation.level=read_committed`. Blocking: run it off the
/// async threads.
pub fn read_progress(cfg: &KafkaConfig, key: &str) -> Result<Option<Vec<u8>>, String> {
    Ok(read_progress_topic(cfg, Some(key))?
        .remove(key.as_bytes())
        .flatten())
}

/// The latest committed value of every key in the progress topic (`None`
/// for a tombstone), or of `only` that key. Blocking.
pub fn read_progress_topic(
    cfg: &KafkaConfig,
    only: Option<&str>,
) -> Result<std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>, String> {
    let topic = cfg.progress_topic.as_str();
    let (mut client, secrets) = client_config(cfg).map_err(|e| e.to_string())?;
    client
        .set("group.id", "pgoutbox-progress-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // At the end of a partition the broker would hold each fetch for
        // fetch.wait.max.ms (500 ms) waiting for data: the reader only
        // wants to learn that it is at the end.
        .set("fetch.wait.max.ms", "10")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer<Reader> = client
        .create_with_context(Reader)
        .map_err(|e| hide(format!("kafka consumer: {e}"), &secrets))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|e| format!("reading the progress topic's metadata: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(format!("the progress topic {topic:?} has no partitions"));
    }
    let mut list = TopicPartitionList::new();
    for &p in &partitions {
        list.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&list).map_err(|e| e.to_string())?;
    let mut at_end = std::collections::HashSet::new();
    let mut latest = std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while at_end.len() < partitions.len() {
        if Instant::now() > deadline {
            return Err(format!(
                "reading the progress topic {topic:?} to its end took over 2 minutes (an open transaction of another producer holds it back?)"
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Ok(m)) => {
                let key = m.key().unwrap_or_default();
                if only.is_none_or(|k| k.as_bytes() == key) {
                    latest.insert(key.to_vec(), m.payload().map(<[u8]>::to_vec));
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(format!("reading the progress topic {topic:?}: {e}")),
        }
    }
    let_go(consumer);
    Ok(latest)
}

//! The Kafka sink: an idempotent rdkafka producer whose delivery reports come
//! back to the relay as [`Delivery`] values on a channel.
//!
//! Guarantees it is configured for (ARCHITECTURE.md, invariant 4): `enable.idempotence=true`,
//! `acks=all`, and librdkafka's bounded in-flight requests per connection, so
//! records with the same key (the aggregate id) land on one partition in the
//! order they were sent, even across retries.
//!
//! Errors are split by what the relay must do next:
//! - [`SendError::QueueFull`] is backpressure, not an error;
//! - [`Failure::Permanent`] means this record can never be published (too
//!   large, invalid topic): the relay dead-letters the row and moves on;
//! - [`Failure::Transient`] means the session must be restarted and the
//!   unconfirmed tail re-read from the slot.
//!
//! Metrics (see [`crate::metrics`]): the producer counts what Kafka
//! acknowledged and what failed per topic, the events in flight and the
//! send → acknowledgement latency (librdkafka's own measure); it also keeps
//! the process's view of Kafka's health current ([`Sink::probe_cluster`]).
//!
//! Security (SSL, SASL/SCRAM, mTLS) is configured with librdkafka properties
//! in `kafka.properties`, passed through as they are; the SASL password may
//! come from `kafka.sasl_password_file` instead (docs/security-kafka.md).
//! Secret values never reach logs or errors: authentication and TLS failures
//! are logged with librdkafka's reason, which never contains them.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::mpsc;

use crate::config::{KafkaConfig, Mode};
use crate::metrics::{self, health, metrics};
use crate::pipeline::{CommitFuture, Delivery, Failure, KafkaRecord, RecordSink, SendError};

/// The ticket of a progress record (exactly-once delivery): its delivery
/// report is not the pipeline's business, and it is not an event.
pub(super) const PROGRESS_TICKET: usize = usize::MAX;

/// The producer could not be created.
#[derive(Debug, thiserror::Error)]
#[error("kafka producer: {0}")]
pub struct SinkError(String);

pub(super) struct Context {
    deliveries: mpsc::UnboundedSender<Delivery>,
    fatal: Arc<AtomicBool>,
    /// The `mode` label of this producer's metrics.
    mode: Mode,
    /// Records enqueued and not yet reported, as counted in the in-flight
    /// gauge; what is left when the producer is destroyed is taken out.
    outstanding: AtomicI64,
    /// Client errors logged recently (repeats are counted, not logged).
    repeats: Repeats,
}

impl Drop for Context {
    // Runs once librdkafka is destroyed: no delivery report comes after.
    fn drop(&mut self) {
        metrics()
            .kafka_in_flight
            .sub(self.outstanding.load(Ordering::SeqCst));
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code() {
            // Exactly-once: another relay with the same transactional.id
            // called init_transactions. This producer can write nothing
            // more; the relay stands by (its next session finds the slot
            // or the serving lock taken).
            Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced) => {
                self.fatal.store(true, Ordering::SeqCst);
                tracing::warn!(%reason, "this relay's Kafka producer was fenced: another relay with the same transactional.id took over this stream; this relay stops serving and stands by");
            }
            Some(RDKafkaErrorCode::Fatal) => {
                self.fatal.store(true, Ordering::SeqCst);
                tracing::error!(%reason, "kafka producer hit a fatal error; it will be rebuilt");
            }
            // The producer keeps retrying (the credentials or the broker may
            // be fixed), but nothing is delivered until then: say what to
            // check.
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                tracing::error!(
                    %reason,
                    "kafka authentication failed: check sasl.mechanisms, sasl.username and the \
                     password (kafka.sasl_password_file, KAFKA_SASL_PASSWORD or \
                     kafka.properties \"sasl.password\"); nothing is delivered until it succeeds"
                );
            }
            Some(RDKafkaErrorCode::SSL) => {
                tracing::error!(
                    %reason,
                    "kafka TLS connection failed: check ssl.ca.location (the CA that signed the \
                     broker's certificate), the broker's host name, and the client certificate \
                     if the broker requires one; nothing is delivered until it succeeds"
                );
            }
            code => {
                let key = code.map_or(-1, |c| c as i32);
                if let Some(repeated) = self.repeats.admit(key) {
                    tracing::warn!(error = %error, %reason, repeated, "kafka client error");
                }
            }
        }
    }
}

/// How often one kind of client error is logged: librdkafka reports a
/// broker that refuses connections at every reconnection attempt (tens of
/// times a second during an outage), which would bury every other line.
const CLIENT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The last time each client error code was logged, and how many reports
/// were left out since.
#[derive(Default)]
pub(super) struct Repeats(
    std::sync::Mutex<std::collections::HashMap<i32, (std::time::Instant, u64)>>,
);

impl Repeats {
    /// `Some(n)` when a report of `code` should be logged now (`n` reports
    /// of it were left out since the last line), `None` to leave it out.
    fn admit(&self, code: i32) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&code) {
            Some((at, left_out)) if now.duration_since(*at) < CLIENT_ERROR_LOG_INTERVAL => {
                *left_out += 1;
                None
            }
            Some((at, left_out)) => {
                *at = now;
                Some(std::mem::take(left_out))
            }
            None => {
                seen.insert(code, (now, 0));
                Some(0)
            }
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, ticket: usize) {
        use rdkafka::message::Message;
        if ticket == PROGRESS_TICKET {
            // A failure dooms the transaction; its commit reports it.
            return;
        }
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        let m = metrics();
        m.kafka_in_flight.dec();
        let result = match result {
            Ok(msg) => {
                // SAFETY: the message of this delivery report, alive for the
                // call; librdkafka only reads it.
                let micros = unsafe { rdkafka::bindings::rd_kafka_message_latency(msg.ptr()) };
                if micros >= 0 {
                    m.kafka_ack_latency.observe(micros as f64 / 1e6);
                }
                m.with_topic(self.mode, msg.topic(), |c| c.published.inc());
                health().kafka_acked();
                Ok(())
            }
            Err((e, msg)) => {
                let failure = classify(e);
                if let Failure::Transient(_) = failure {
                    m.with_topic(self.mode, msg.topic(), |c| c.failed.inc());
                }
                Err(failure)
            }
        };
        // The receiver is gone only when the session ended; a later session
        // re-reads unconfirmed events from the slot.
        let _ = self.deliveries.send(Delivery {
            ticket: ticket as u64,
            result,
        });
    }
}

/// Maps a librdkafka error to what the relay does about it.
pub fn classify(error: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let text = error.to_string();
    match error.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::MessageBatchTooLarge
            | C::InvalidRecord
            | C::InvalidTopic
            | C::InvalidMessage,
        ) => Failure::Permanent(text),
        _ => Failure::Transient(text),
    }
}

/// The first line of `kafka.sasl_password_file`.
fn read_password_file(path: &str) -> Result<String, SinkError> {
    let field = "kafka.sasl_password_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| SinkError(format!("{field}: cannot read {path}: {e}")))?;
    let password = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    if password.is_empty() {
        return Err(SinkError(format!(
            "{field}: {path} has an empty first line"
        )));
    }
    Ok(password.to_owned())
}

/// The client settings every Kafka client of the relay shares (brokers,
/// security properties, the SASL password), and the secret values to keep
/// out of any error text.
pub(super) fn client_config(cfg: &KafkaConfig) -> Result<(ClientConfig, Vec<String>), SinkError> {
    let mut client = ClientConfig::new();
    let mut secrets: Vec<String> = Vec::new();
    for (k, v) in &cfg.properties {
        client.set(k, v);
        if KafkaConfig::is_secret_property(k) && !v.is_empty() {
            secrets.push(v.clone());
        }
    }
    if let Some(path) = &cfg.sasl_password_file {
        let password = read_password_file(path)?;
        client.set("sasl.password", &password);
        secrets.push(password);
    }
    client.set("bootstrap.servers", &cfg.brokers);
    if !cfg.properties.contains_key("client.id") {
        client.set("client.id", "pgoutbox");
    }
    Ok((client, secrets))
}

/// `text` with every secret replaced by `***`.
pub(super) fn hide(mut text: String, secrets: &[String]) -> String {
    for secret in secrets {
        text = text.replace(secret.as_str(), "***");
    }
    text
}

/// An idempotent Kafka producer (transactional for exactly-once delivery).
pub struct Sink {
    pub(super) producer: Arc<ThreadedProducer<Context>>,
    fatal: Arc<AtomicBool>,
    mode: Mode,
    probe: Option<tokio::task::AbortHandle>,
    /// `kafka.transaction_timeout_ms`: how long a commit or abort may try.
    pub(super) transaction_timeout: Duration,
    /// A transactional producer (exactly-once delivery).
    transactional: bool,
}

impl Drop for Sink {
    /// Purges what this producer still holds, queued or in flight, before
    /// the handle is released. The relay drops a sink when its session
    /// ends (a delivery failed, the stream closed) and the next session
    /// resends everything not confirmed through a new producer. A handle
    /// may outlive the sink (a cluster probe blocked in a metadata request
    /// keeps it until Kafka answers); had the old producer kept its queue,
    /// it would deliver the later events of the failed run when Kafka came
    /// back, before the new producer resent the earlier ones — an
    /// aggregate's events out of order for a consumer deduplicating on
    /// `tracking_id` (ARCHITECTURE.md, invariant 4).
    ///
    /// A transactional producer is left as it is: what it still sends can
    /// only land in its open transaction, which the next session's
    /// `init_transactions` aborts (or which fails as fenced), so no
    /// `read_committed` reader sees it; and it may be committing on another
    /// thread, which a purge would race. Left alive, it also learns that
    /// it was fenced and says so.
    fn drop(&mut self) {
        if let Some(probe) = &self.probe {
            probe.abort();
        }
        if !self.transactional {
            self.producer
                .purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        }
    }
}

/// Asks the cluster for the brokers and the topics this producer already
/// knows (never every topic of the cluster), waiting at most `timeout`.
fn ask_cluster(producer: &ThreadedProducer<Context>, timeout: Duration) -> Result<(), String> {
    use rdkafka::bindings as rd;
    let mut md: *const rd::rd_kafka_metadata = std::ptr::null();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the producer's live handle; no topic handle is passed
    // (all_topics = 0: locally known topics only); the metadata returned is
    // freed below and never read.
    let err = unsafe {
        rd::rd_kafka_metadata(
            producer.client().native_ptr(),
            0,
            std::ptr::null_mut(),
            &mut md,
            timeout_ms,
        )
    };
    if !md.is_null() {
        // SAFETY: returned by rd_kafka_metadata above, freed once.
        unsafe { rd::rd_kafka_metadata_destroy(md) };
    }
    if err == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
        Ok(())
    } else {
        Err(format!(
            "metadata request failed: {}",
            RDKafkaErrorCode::from(err)
        ))
    }
}

impl Sink {
    /// Builds the producer for the relay running in `mode` (the `mode`
    /// label of its metrics); delivery reports arrive on the returned
    /// channel.
    pub fn new(
        cfg: &KafkaConfig,
        mode: Mode,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<Delivery>), SinkError> {
        Sink::build(cfg, mode, None)
    }

    /// A transactional producer with `transactional_id` (exactly-once
    /// delivery, CDC); call [`Sink::init_transactions`] before sending.
    pub fn transactional(
        cfg: &KafkaConfig,
        transactional_id: &str,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<Delivery>), SinkError> {
        Sink::build(cfg, Mode::Cdc, Some(transactional_id))
    }

    fn build(
        cfg: &KafkaConfig,
        mode: Mode,
        transactional_id: Option<&str>,
    ) -> Result<(Sink, mpsc::UnboundedReceiver<Delivery>), SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let fatal = Arc::new(AtomicBool::new(false));
        let (mut client, secrets) = client_config(cfg)?;
        let queue_messages = (cfg.window_events() * 2).max(100_000);
        if let Some(id) = transactional_id {
            client.set("transactional.id", id).set(
                "transaction.timeout.ms",
                cfg.transaction_timeout_ms.to_string(),
            );
        }
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &cfg.compression)
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("message.max.bytes", cfg.message_max_bytes.to_string())
            .set("queue.buffering.max.messages", queue_messages.to_string());
        // Kafka Connect's (Java) producer puts a keyed record on
        // murmur2(key) % partitions; librdkafka's default hashes with
        // CRC32. A drop-in for Debezium keeps every aggregate on the
        // partition Debezium used (ARCHITECTURE.md, invariant 4).
        if cfg.format == crate::config::RecordFormat::Debezium
            && !cfg.properties.contains_key("partitioner")
        {
            client.set("partitioner", "murmur2_random");
        }
        let context = Context {
            deliveries: tx,
            fatal: fatal.clone(),
            mode,
            outstanding: AtomicI64::new(0),
            repeats: Repeats::default(),
        };
        let producer: ThreadedProducer<Context> = client
            .create_with_context(context)
            .map_err(|e| SinkError(hide(e.to_string(), &secrets)))?;
        Ok((
            Sink {
                producer: Arc::new(producer),
                fatal,
                mode,
                probe: None,
                transaction_timeout: Duration::from_millis(cfg.transaction_timeout_ms),
                transactional: transactional_id.is_some(),
            },
            rx,
        ))
    }

    /// Starts keeping Kafka's health ([`mod@crate::metrics::health`]) current
    /// for as long as this sink lives: whenever no event was acknowledged
    /// for [`metrics::health::KAFKA_PROBE_INTERVAL`] (or the last probe
    /// failed), the producer asks the cluster for metadata and reports the
    /// answer. Needs a Tokio runtime; without one it does nothing.
    pub fn probe_cluster(&mut self) {
        use metrics::health::KAFKA_PROBE_INTERVAL;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let producer: Weak<ThreadedProducer<Context>> = Arc::downgrade(&self.producer);
        let task = runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !health().kafka_probe_due(KAFKA_PROBE_INTERVAL) {
                    continue;
                }
                let Some(p) = producer.upgrade() else { return };
                let answer =
                    tokio::task::spawn_blocking(move || ask_cluster(&p, KAFKA_PROBE_INTERVAL))
                        .await;
                match answer {
                    Ok(Ok(())) => health().kafka_ok(),
                    Ok(Err(why)) => {
                        tracing::debug!(error = %why, "Kafka probe failed");
                        health().kafka_failed(&why);
                    }
                    Err(_) => return,
                }
            }
        });
        if let Some(old) = self.probe.replace(task.abort_handle()) {
            old.abort();
        }
    }

    /// Enqueues one record. Its outcome arrives later as a [`Delivery`]
    /// carrying `ticket`.
    pub fn send(&self, ticket: u64, record: &KafkaRecord) -> Result<(), SendError> {
        let ticket = ticket as usize;
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key: key.as_ref(),
                value: value.as_deref(),
            });
        }
        let topic = record.topic.as_str();
        let mut base = BaseRecord::with_opaque_to(topic, ticket)
            .key(&record.key[..])
            .headers(headers);
        if !record.tombstone {
            base = base.payload(&record.value[..]);
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(ms) = record.timestamp {
            base = base.timestamp(ms);
        }
        let record = base;
        // Counted before the send: its report may come before `send` returns.
        let context = self.producer.context();
        context.outstanding.fetch_add(1, Ordering::SeqCst);
        let m = metrics();
        health().kafka_sent(m.kafka_in_flight.get());
        m.kafka_in_flight.inc();
        match self.producer.send(record) {
            Ok(()) => Ok(()),
            Err((e, _)) => {
                context.outstanding.fetch_sub(1, Ordering::SeqCst);
                m.kafka_in_flight.dec();
                match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::QueueFull) => Err(SendError::QueueFull),
                    _ => {
                        let failure = classify(&e);
                        if let Failure::Transient(_) = failure {
                            m.with_topic(self.mode, topic, |c| c.failed.inc());
                        }
                        Err(failure.into())
                    }
                }
            }
        }
    }

    /// True once librdkafka reported a fatal error (e.g. the idempotent
    /// producer lost its sequence state); the producer must be rebuilt.
    ///
    /// Asks librdkafka itself: with the event API rdkafka uses, the error
    /// callback receives a fatal error under its underlying code (e.g.
    /// `OutOfOrderSequenceNumber`), not `Fatal`, so the callback alone
    /// cannot tell.
    pub fn is_fatal(&self) -> bool {
        if self.fatal.load(Ordering::SeqCst) {
            return true;
        }
        let Some((code, reason)) = self.producer.client().fatal_error() else {
            return false;
        };
        if !self.fatal.swap(true, Ordering::SeqCst) {
            tracing::error!(error = ?code, %reason, "kafka producer hit a fatal error; it will be rebuilt");
        }
        true
    }

    /// Whether the cluster answers a metadata request within `timeout`
    /// (blocking; call it off the async threads). Tells a failure of one
    /// record (its topic) from Kafka being unreachable for everything
    /// (brokers down, credentials refused).
    pub fn cluster_reachable(&self, timeout: Duration) -> bool {
        self.producer.client().fetch_metadata(None, timeout).is_ok()
    }

    /// Waits up to `timeout` for every enqueued record to be delivered.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.producer.flush(timeout).is_ok()
    }
}

impl RecordSink for Sink {
    fn send(&self, ticket: u64, record: &KafkaRecord) -> Result<(), SendError> {
        Sink::send(self, ticket, record)
    }

    fn is_fatal(&self) -> bool {
        Sink::is_fatal(self)
    }

    fn flush(&self, timeout: Duration) -> bool {
        Sink::flush(self, timeout)
    }

    fn begin_transaction(&self, progress: KafkaRecord) -> Result<(), crate::pipeline::TxnFailure> {
        Sink::begin_transaction(self, progress)
    }

    fn commit_transaction(&self, progress: KafkaRecord) -> CommitFuture {
        Sink::commit_transaction(self, progress)
    }

    fn abort_transaction(&self) -> CommitFuture {
        Sink::abort_transaction(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_topic_errors_are_permanent_others_transient() {
        let perm = [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidTopic,
        ];
        for code in perm {
            assert!(matches!(
                classify(&KafkaError::MessageProduction(code)),
                Failure::Permanent(_)
            ));
        }
        let trans = [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::Fatal,
        ];
        for code in trans {
            assert!(matches!(
                classify(&KafkaError::MessageProduction(code)),
                Failure::Transient(_)
            ));
        }
    }

    #[test]
    fn a_fatal_error_is_seen_whatever_code_the_callback_got() {
        let cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        let (sink, _rx) = Sink::new(&cfg, Mode::Cdc).unwrap();
        assert!(!sink.is_fatal());
        let reason = std::ffi::CString::new("test").unwrap();
        // SAFETY: the producer's own handle, alive for the call.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                sink.producer.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            )
        };
        assert_eq!(
            err,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        );
        assert!(sink.is_fatal());
    }

    #[test]
    fn a_repeated_client_error_is_logged_once_per_interval_with_its_count() {
        let repeats = Repeats::default();
        assert_eq!(repeats.admit(1), Some(0));
        assert_eq!(repeats.admit(1), None);
        assert_eq!(repeats.admit(1), None);
        assert_eq!(repeats.admit(2), Some(0), "another code is logged at once");
        // Back-date the last line of code 1 past the interval.
        repeats.0.lock().unwrap().get_mut(&1).unwrap().0 -= CLIENT_ERROR_LOG_INTERVAL;
        assert_eq!(repeats.admit(1), Some(2), "the two left out are counted");
        assert_eq!(repeats.admit(1), None);
    }

    #[test]
    fn a_dropped_sink_keeps_nothing_queued_for_later_delivery() {
        // Nothing listens on port 1: every record stays queued, as when
        // Kafka is down and the session gives up on a timed-out send.
        let cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        let (sink, mut deliveries) = Sink::new(&cfg, Mode::Cdc).unwrap();
        let record = KafkaRecord {
            topic: "orders".into(),
            key: bytes::Bytes::from_static(b"aggregate-1"),
            value: bytes::Bytes::from_static(b"{}"),
            tombstone: false,
            headers: Vec::new(),
            partition: None,
            timestamp: None,
        };
        for ticket in 0..5 {
            sink.send(ticket, &record).unwrap();
        }
        // A handle that outlives the sink, as a cluster probe blocked in a
        // metadata request holds one.
        let held = sink.producer.clone();
        drop(sink);
        // The five are reported failed (purged): nothing stays queued for
        // the held producer to deliver once a broker answers. (Without the
        // purge they would wait for a broker until message.timeout.ms.)
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut purged = 0;
        while purged < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "still queued after the sink was dropped: {purged} of 5 reported"
            );
            match deliveries.try_recv() {
                Ok(d) => {
                    assert!(d.result.is_err(), "ticket {} delivered", d.ticket);
                    purged += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        drop(held);
    }

    #[test]
    fn sasl_password_file_is_read_and_its_errors_name_the_field() {
        let dir = std::env::temp_dir().join(format!("pgoutbox-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kafka-password");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let path = file.to_str().unwrap().to_owned();
        assert_eq!(read_password_file(&path).unwrap(), "s3cret");
        let mut cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            sasl_password_file: Some(path.clone()),
            ..KafkaConfig::default()
        };
        cfg.properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        cfg.properties
            .insert("sasl.mechanisms".into(), "SCRAM-SHA-256".into());
        cfg.properties.insert("sasl.username".into(), "u".into());
        assert!(Sink::new(&cfg, Mode::Cdc).is_ok());
        std::fs::write(&file, "\n").unwrap();
        let e = read_password_file(&path).unwrap_err().to_string();
        assert!(e.contains("kafka.sasl_password_file"), "{e}");
        let missing = dir.join("missing").to_str().unwrap().to_owned();
        cfg.sasl_password_file = Some(missing);
        let e = Sink::new(&cfg, Mode::Cdc).err().unwrap().to_string();
        assert!(e.contains("kafka.sasl_password_file: cannot read"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn producer_errors_never_repeat_a_secret() {
        let mut cfg = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        // librdkafka's error names the key file, whose name here holds the
        // secret: it must not show.
        for (k, v) in [
            ("security.protocol", "SSL"),
            ("ssl.key.password", "hunter2"),
            ("ssl.certificate.location", "/nonexistent/hunter2.crt"),
            ("ssl.key.location", "/nonexistent/hunter2.key"),
        ] {
            cfg.properties.insert(k.into(), v.into());
        }
        let e = Sink::new(&cfg, Mode::Cdc)
            .err()
            .expect("missing key files are refused")
            .to_string();
        assert!(e.contains("ssl"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

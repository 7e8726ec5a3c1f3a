//! Issue 6, scenario 6: the Kafka producer hit by a fatal idempotence error
//! is rebuilt and nothing is lost, in CDC and in poll mode.
//!
//! PostgreSQL is the real one of `scripts/services`. Kafka is librdkafka's
//! mock cluster, created in this test process: a real broker cannot be made
//! to fail an idempotent producer fatally on demand. The mock listens on
//! localhost TCP ports, so the relay (a child process, as in every other
//! test) connects to it like to any broker.
//!
//! The injected fault: the mock answers the next Produce request with
//! `OUT_OF_ORDER_SEQUENCE_NUMBER`. For a non-transactional idempotent
//! producer librdkafka (2.12, `rd_kafka_handle_idempotent_Produce_error`)
//! raises a fatal error when that request was the head of the partition's
//! in-flight requests (its base sequence is the next one to be acked):
//! producer and broker disagree on the sequence state and it can no longer
//! guarantee order or once-ness. Only a failure of a *later* request
//! (skipped sequence numbers) is recovered by an epoch bump. The next
//! Produce after the relay went idle is always head-of-line, so the fault
//! is fatal every time. (`UNKNOWN_PRODUCER_ID` on a first attempt is
//! recovered by an epoch bump; restricting InitProducerId's ApiVersion only
//! matters to the transactional producer, which needs KIP-360 to bump.)

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::harness::{wait_for, Relay, TestOutbox};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);
const PARTITIONS: i32 = 3;
/// The line `src/sink/kafka.rs` logs when librdkafka reports a fatal error.
const FATAL_LINE: &str = "kafka producer hit a fatal error; it will be rebuilt";

type Mock = MockCluster<'static, DefaultProducerContext>;

/// A one-broker mock cluster holding `topic`.
fn mock_cluster(topic: &str) -> Mock {
    let mock = MockCluster::new(1).expect("create the mock cluster");
    mock.create_topic(topic, PARTITIONS, 1)
        .expect("create the topic on the mock cluster");
    mock
}

/// Publishes `n` events (one transaction each) for aggregates chosen
/// round-robin from `aggregates`.
async fn publish(outbox: &TestOutbox, aggregates: &[Uuid], n: usize, phase: &str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = outbox
            .publish(
                "Order",
                aggregates[i % aggregates.len()],
                "Placed",
                &json!({ "phase": phase, "seq": i }),
            )
            .await;
        ids.push(id);
    }
    ids
}

/// Waits until exactly `n` rows exist and all are `COMPLETED`.
async fn all_completed(outbox: &TestOutbox, relay: &Relay, n: usize, what: &str) {
    let expected = n as i64;
    let reached = tokio::time::timeout(
        DEADLINE,
        wait_for(what, DEADLINE + Duration::from_secs(1), || async {
            let s = outbox.statuses().await;
            (s.get("COMPLETED") == Some(&expected) && s.len() == 1).then_some(())
        }),
    )
    .await;
    if reached.is_err() {
        panic!(
            "timed out waiting for {what}: {:?}\nrelay log:\n{}",
            outbox.statuses().await,
            relay.log_text()
        );
    }
}

/// Reads every partition of `topic` on the mock cluster from the beginning
/// until each of `expected` was seen and every partition is read to its high
/// watermark; returns how many times each tracking id was delivered.
fn read_mock(
    bootstrap: &str,
    topic: &str,
    expected: &[Uuid],
    timeout: Duration,
) -> HashMap<String, usize> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "pgoutbox-tests-producer-fatal")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create a consumer on the mock cluster");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&tpl).expect("assign");
    let want: HashSet<String> = expected.iter().map(Uuid::to_string).collect();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut next: HashMap<i32, i64> = HashMap::new();
    let deadline = Instant::now() + timeout;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let tracking_id = m
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|hd| hd.key == "tracking_id")
                            .and_then(|hd| hd.value)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                    })
                    .unwrap_or_default();
                *counts.entry(tracking_id).or_default() += 1;
                next.insert(m.partition(), m.offset() + 1);
            }
            Some(Err(e)) => eprintln!("consumer error: {e}"),
            None => {}
        }
        if want.iter().all(|w| counts.contains_key(w)) {
            let drained = (0..PARTITIONS).all(|p| {
                let high = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .map(|(_, h)| h)
                    .unwrap_or(i64::MAX);
                next.get(&p).copied().unwrap_or(0) >= high
            });
            if drained {
                return counts;
            }
        }
        let seen = want.iter().filter(|w| counts.contains_key(*w)).count();
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} reading {topic} from the mock cluster: {seen} of {} events seen",
            want.len()
        );
    }
}

/// The scenario, for the relay started with `args`: events flow through the
/// mock cluster; then the next Produce request is answered with
/// OUT_OF_ORDER_SEQUENCE_NUMBER, which librdkafka treats as fatal; the relay
/// must rebuild its producer (a new session) and deliver every event, each
/// row ending `COMPLETED`. Returns the relay's log.
async fn fatal_error_is_survived(name: &str, args: &[&str], extra_config: &str) -> String {
    let mut outbox = TestOutbox::new(name).await;
    let topic = outbox.topic("Order");
    let mock = mock_cluster(&topic);
    let bootstrap = mock.bootstrap_servers();
    outbox.env.push(("KAFKA_BROKERS".into(), bootstrap.clone()));
    outbox.extra_config = extra_config.into();
    let mut relay = Relay::spawn(outbox.command_with_args(args), name);
    let aggregates: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();

    // Normal operation against the mock first.
    let mut expected = publish(&outbox, &aggregates, 10, "before").await;
    all_completed(
        &outbox,
        &relay,
        expected.len(),
        "the first events COMPLETED",
    )
    .await;
    assert!(
        !relay.log_text().contains(FATAL_LINE),
        "fatal error before the fault was injected:\n{}",
        relay.log_text()
    );

    // The fault: the next Produce request fails with a head-of-line
    // sequence error.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    expected.extend(publish(&outbox, &aggregates, 40, "after").await);

    let log = wait_for("the fatal producer error in the log", DEADLINE, || async {
        let log = relay.log_text();
        log.contains(FATAL_LINE).then_some(log)
    })
    .await;
    assert!(
        log.contains("sequence desynchronization"),
        "the fatal error is not the injected sequence error:\n{log}"
    );
    all_completed(&outbox, &relay, expected.len(), "every row COMPLETED").await;
    assert!(
        relay.running(),
        "the relay exited instead of rebuilding its producer:\n{}",
        relay.log_text()
    );

    let counts = tokio::task::spawn_blocking({
        let (bootstrap, topic, expected) = (bootstrap.clone(), topic.clone(), expected.clone());
        move || read_mock(&bootstrap, &topic, &expected, DEADLINE)
    })
    .await
    .expect("consumer task");
    let missing = expected
        .iter()
        .filter(|id| !counts.contains_key(&id.to_string()))
        .count();
    assert_eq!(missing, 0, "events lost after the fatal error");
    let strangers = counts
        .keys()
        .filter(|k| !expected.iter().any(|id| &id.to_string() == *k))
        .count();
    assert_eq!(
        strangers, 0,
        "records that were never published: {counts:?}"
    );

    let log = relay.log_text();
    let status = relay.terminate();
    assert!(status.success(), "relay exit status {status:?}:\n{log}");
    drop(mock);
    log
}

/// The log after the first fatal-error line.
fn after_fatal(log: &str) -> &str {
    let at = log.find(FATAL_LINE).expect("fatal line");
    &log[at..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdc_rebuilds_a_fatally_failed_producer_and_loses_nothing() {
    let log = fatal_error_is_survived("fatal_cdc", &["run"], "").await;
    let after = after_fatal(&log);
    // The session ended because of the fatal error, and a new one (with a
    // new producer: each session builds its own) negotiated the stream again.
    let ended = after
        .lines()
        .find(|l| l.contains("session ended; reconnecting"))
        .unwrap_or_else(|| panic!("no session restart after the fatal error:\n{log}"));
    assert!(
        ended.to_lowercase().contains("fatal"),
        "the session ended for another reason: {ended}"
    );
    assert!(
        after.contains("negotiated pgoutput"),
        "no new session started after the fatal error:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_rebuilds_a_fatally_failed_producer_and_loses_nothing() {
    let config = "[outbox]\npoll_interval_ms = 100\n\n[poll]\nconcurrency = 2\nbackoff_base_ms = 100\nbackoff_max_ms = 400\n";
    let log = fatal_error_is_survived("fatal_poll", &["run", "--mode", "poll"], config).await;
    let after = after_fatal(&log);
    // A worker saw `sink.is_fatal()`; the supervisor ended the session and
    // started a new one (each builds its own producer), keeping the lock.
    let ended = after
        .lines()
        .find(|l| l.contains("session ended; reconnecting"))
        .unwrap_or_else(|| panic!("no session restart after the fatal error:\n{log}"));
    assert!(
        ended.contains("the Kafka producer hit a fatal error and must be rebuilt"),
        "the session ended for another reason: {ended}"
    );
    let restarted = after
        .find("session ended; reconnecting")
        .expect("checked above");
    assert!(
        after[restarted..].contains("polling with a new Kafka producer"),
        "the poll relay did not start serving again:\n{log}"
    );
}

/// Issue 14: exactly-once delivery against brokers that do not support
/// transactions (the mock with `InitProducerId` disabled, as a broker older
/// than 0.11 has no such API): the relay stops at start, non-zero, with one
/// line saying why and what to do, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_against_brokers_without_transactions_stops_with_what_to_do() {
    let mut outbox = TestOutbox::new("eos_old_broker").await;
    let topic = outbox.topic("Order");
    let mock = mock_cluster(&topic);
    mock.create_topic(&format!("{topic}.progress"), 1, 1)
        .expect("create the progress topic on the mock cluster");
    mock.apiversion(RDKafkaApiKey::InitProducerId, None, None)
        .expect("disable InitProducerId");
    outbox.env.extend([
        ("KAFKA_BROKERS".into(), mock.bootstrap_servers()),
        ("OUTBOX_DELIVERY".into(), "exactly-once".into()),
        ("KAFKA_PROGRESS_TOPIC".into(), format!("{topic}.progress")),
    ]);
    outbox
        .publish("Order", Uuid::new_v4(), "Placed", &json!({}))
        .await;
    let relay = Relay::spawn(outbox.command_with_args(&["run"]), "eos_old_broker");
    let (status, log) = tokio::task::spawn_blocking(move || relay.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert!(!status.success(), "the relay ran:\n{log}");
    assert!(
        log.contains("do not support transactions")
            && log.contains("kafka.delivery = \"at-least-once\""),
        "no clear reason:\n{log}"
    );
    drop(mock);
}

//! `pgoutbox replay` against the real PostgreSQL and Kafka, through the
//! binary: exactly the selected events arrive again, byte for byte as they
//! were first delivered plus the `pgoutbox_replay` header; dry runs, the
//! topic override, the rate limit, the audit row, dead letters, a replay
//! beside a running relay, and one-line refusals.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Output;
use std::time::{Duration, Instant};

use common::harness::{output_checked, read_topics, topic_record_count, wait_for, TestOutbox};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

/// A record read back with everything a consumer can see, headers in
/// order and as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Raw {
    topic: String,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn tracking_id(&self) -> String {
        self.header("tracking_id").unwrap_or_default()
    }

    /// The record without the replay header.
    fn unmarked(&self) -> Raw {
        let mut r = self.clone();
        r.headers.retain(|(k, _)| k != "pgoutbox_replay");
        r
    }
}

/// Every record of `topics`, read from the beginning until at least
/// `want` were read and every partition is read to its end.
fn read_raw(topics: &[String], want: usize) -> Vec<Raw> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &common::services().kafka_brokers)
        .set("group.id", "pgoutbox-replay-tests")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create consumer");
    let deadline = Instant::now() + DEADLINE;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("topic metadata");
        for topic in md.topics() {
            for p in topic.partitions() {
                tpl.add_partition_offset(t, p.id(), Offset::Beginning)
                    .expect("add partition");
                ends.insert((t.clone(), p.id()), 0);
            }
        }
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    loop {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let mut headers = Vec::new();
            if let Some(h) = m.headers() {
                for i in 0..h.count() {
                    let hd = h.get(i);
                    headers.push((hd.key.to_owned(), hd.value.map(<[u8]>::to_vec)));
                }
            }
            next.insert((m.topic().to_owned(), m.partition()), m.offset() + 1);
            out.push(Raw {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        if out.len() >= want {
            let all_read = ends.keys().all(|(t, p)| {
                let high = consumer
                    .fetch_watermarks(t, *p, Duration::from_secs(5))
                    .map(|(_, h)| h)
                    .unwrap_or(0);
                next.get(&(t.clone(), *p)).copied().unwrap_or(0) >= high
            });
            if all_read {
                return out;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out reading {topics:?}: {} of {want} records",
            out.len()
        );
    }
}

/// `pgoutbox replay <args>` as the operator (the admin role).
fn replay(outbox: &TestOutbox, args: &[&str]) -> Output {
    let mut cmd = outbox.admin_command();
    cmd.arg("replay").args(args);
    output_checked(&mut cmd)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts success; returns stdout parsed as JSON (the command ran with
/// `--json`).
fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "pgoutbox replay failed:\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

/// Asserts a failure ending with exactly one `error: …` line; returns it.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure:\nstdout:\n{}\nstderr:\n{stderr}",
        stdout(out)
    );
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("error: "),
        "ends with an error line:\n{stderr}"
    );
    let error_lines = stderr.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(error_lines, 1, "one error line:\n{stderr}");
    last
}

/// Inserts a row directly, `age_secs` old, in `status`; returns its
/// tracking id.
async fn insert(
    outbox: &TestOutbox,
    aggregate_type: &str,
    aggregate_id: Uuid,
    event_type: &str,
    status: &str,
    age_secs: f64,
    payload: &Value,
) -> Uuid {
    outbox
        .client
        .query_one(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, metadata, \
                   status, retry_count, last_error, created_at, processed_at) \
                 VALUES ($1, $2, $3, $4, '{{\"tenant\": \"acme\"}}', $5, \
                   CASE WHEN $5 = 'DEAD_LETTER' THEN 5 ELSE 1 END, \
                   CASE WHEN $5 = 'DEAD_LETTER' THEN 'broker: topic authorization failed' END, \
                   now() - make_interval(secs => $6::float8), now()) \
                 RETURNING tracking_id",
                outbox.name
            ),
            &[&aggregate_id, &aggregate_type, &event_type, payload, &status, &age_secs],
        )
        .await
        .expect("insert an outbox row")
        .get(0)
}

/// Every column of every row, as text, with the row version (`xmin`): a
/// replay must leave all of it as it was.
async fn row_states(outbox: &TestOutbox) -> Vec<String> {
    outbox
        .client
        .query(
            &format!(
                "SELECT o.xmin::text || ' ' || row_to_json(o)::text FROM {}.outbox AS o ORDER BY id",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("read rows")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// The audit rows, oldest first, as JSON objects.
async fn audit(outbox: &TestOutbox) -> Vec<Value> {
    outbox
        .client
        .query(
            &format!(
                "SELECT row_to_json(a) FROM {}.pgoutbox_replays AS a ORDER BY id",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("read the replay audit table")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

async fn current_user(outbox: &TestOutbox) -> String {
    outbox
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// `created_at` of a row shifted by `secs`, as RFC 3339 UTC.
async fn created_plus(outbox: &TestOutbox, id: Uuid, secs: f64) -> String {
    outbox
        .client
        .query_one(
            &format!(
                "SELECT to_char((created_at + make_interval(secs => $2::float8)) AT TIME ZONE 'UTC', \
                   'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM {}.outbox WHERE tracking_id = $1",
                outbox.name
            ),
            &[&id, &secs],
        )
        .await
        .unwrap()
        .get(0)
}

/// The slot's walsender pid and confirmed_flush_lsn.
async fn slot(outbox: &TestOutbox) -> (Option<i32>, i64) {
    let r = outbox
        .client
        .query_one(
            "SELECT active_pid, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint \
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&outbox.slot()],
        )
        .await
        .expect("the relay's slot");
    (r.get(0), r.get(1))
}

async fn wait_completed(outbox: &TestOutbox, n: i64) {
    wait_for("every row COMPLETED", DEADLINE, || async {
        let s = outbox.statuses().await;
        (s.get("COMPLETED").copied().unwrap_or(0) == n && s.len() == 1).then_some(())
    })
    .await;
}

fn ids(records: &[Raw]) -> HashSet<String> {
    records.iter().map(Raw::tracking_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_events_are_the_first_delivery_plus_the_replay_header_and_only_the_selected_ones()
{
    let outbox = TestOutbox::new("replay_identity").await;
    let relay = outbox.start_relay();
    let (order_a, order_b, cart) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let meta = json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                      "tenant": "acme", "schema_version": 2});
    let publish = |agg: Uuid, aggregate_type: &'static str, event_type: &'static str, n: i64| {
        let (client, schema, meta) = (&outbox.client, outbox.name.clone(), meta.clone());
        async move {
            client
                .query_one(
                    &format!("SELECT {schema}.outbox_publish($1, $2, $3, $4, $5)"),
                    &[
                        &aggregate_type,
                        &agg,
                        &event_type,
                        &json!({"n": n, "note": "é ✓"}),
                        &meta,
                    ],
                )
                .await
                .unwrap()
                .get::<_, Uuid>(0)
        }
    };
    let mut shipped = Vec::new();
    let mut all = Vec::new();
    for n in 0..3 {
        all.push(publish(order_a, "Order", "OrderCreated", n).await);
    }
    for n in 0..2 {
        let id = publish(order_b, "Order", "OrderShipped", n).await;
        shipped.push(id.to_string());
        all.push(id);
    }
    let mut carts = Vec::new();
    for n in 0..2 {
        let id = publish(cart, "Cart", "CartOpened", n).await;
        carts.push(id.to_string());
        all.push(id);
    }
    wait_completed(&outbox, 7).await;
    let topics = vec![outbox.topic("Order"), outbox.topic("Cart")];
    let first = read_raw(&topics, 7);
    assert_eq!(first.len(), 7, "the relay delivered each event once");
    let first_by_id: HashMap<String, Raw> =
        first.iter().map(|r| (r.tracking_id(), r.clone())).collect();

    // Event type and aggregate type.
    let report = ok_json(&replay(
        &outbox,
        &[
            "--aggregate-type",
            "Order",
            "--event-type",
            "OrderShipped",
            "--reason",
            "consumer rebuilt its projection (INC-9)",
            "--json",
        ],
    ));
    assert_eq!(report["selected"], 2);
    assert_eq!(report["sent"], 2);
    assert_eq!(report["end"], "completed");
    let audit_id = report["audit"]["id"].as_i64().unwrap();
    let after = read_raw(&topics, 9);
    let replayed: Vec<&Raw> = after
        .iter()
        .filter(|r| r.header("pgoutbox_replay").is_some())
        .collect();
    assert_eq!(
        replayed
            .iter()
            .map(|r| r.tracking_id())
            .collect::<HashSet<_>>(),
        shipped.iter().cloned().collect::<HashSet<_>>(),
        "exactly the OrderShipped events, once each"
    );
    assert_eq!(replayed.len(), 2);
    for r in &replayed {
        assert_eq!(r.header("pgoutbox_replay"), Some(audit_id.to_string()));
        assert_eq!(
            r.headers.last().map(|(k, _)| k.as_str()),
            Some("pgoutbox_replay"),
            "the marker comes after the first delivery's headers"
        );
        assert_eq!(
            r.unmarked(),
            first_by_id[&r.tracking_id()],
            "topic, partition, key, value and headers are the first delivery's"
        );
    }

    // One aggregate, by id (any case of the UUID).
    let report = ok_json(&replay(
        &outbox,
        &[
            "--aggregate-id",
            &cart.to_string().to_uppercase(),
            "--reason",
            "cart service replays its aggregate",
            "--json",
        ],
    ));
    assert_eq!(report["sent"], 2);
    let after = read_raw(&topics, 11);
    let second = report["audit"]["id"].as_i64().unwrap().to_string();
    let marked: Vec<&Raw> = after
        .iter()
        .filter(|r| r.header("pgoutbox_replay").as_deref() == Some(second.as_str()))
        .collect();
    assert_eq!(
        marked
            .iter()
            .map(|r| r.tracking_id())
            .collect::<HashSet<_>>(),
        carts.iter().cloned().collect::<HashSet<_>>()
    );
    for r in marked {
        assert_eq!(r.unmarked(), first_by_id[&r.tracking_id()]);
    }
    assert_eq!(after.len(), 11, "nothing else was sent");
    assert_eq!(ids(&after).len(), all.len());
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_time_range_selects_by_created_at_and_the_audit_row_says_who_why_and_what() {
    let outbox = TestOutbox::new("replay_range").await;
    let agg = Uuid::new_v4();
    let mut rows = Vec::new();
    for age in [40.0, 30.0, 20.0, 10.0] {
        rows.push(
            insert(
                &outbox,
                "Order",
                agg,
                "OrderCreated",
                "COMPLETED",
                age,
                &json!({"age": age}),
            )
            .await,
        );
    }
    // [the 30 s old row, the 10 s old row): the 30 s and 20 s old rows.
    let from = created_plus(&outbox, rows[1], 0.0).await;
    let to = created_plus(&outbox, rows[3], 0.0).await;
    let report = ok_json(&replay(
        &outbox,
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--rate",
            "100",
            "--reason",
            "backfill the search index",
            "--json",
        ],
    ));
    assert_eq!(report["selected"], 2, "{report}");
    assert_eq!(report["sent"], 2);
    let records = read_topics(&[outbox.topic("Order")], DEADLINE, |r| r.len() >= 2);
    let got: HashSet<String> = records
        .iter()
        .map(|r| r.header("tracking_id").to_owned())
        .collect();
    assert_eq!(
        got,
        [rows[1], rows[2]].iter().map(Uuid::to_string).collect()
    );
    assert_eq!(records.len(), 2);

    let entries = audit(&outbox).await;
    assert_eq!(entries.len(), 1);
    let a = &entries[0];
    assert_eq!(a["id"], report["audit"]["id"]);
    assert_eq!(a["table_name"], "outbox");
    assert_eq!(a["performed_by"], current_user(&outbox).await);
    assert_eq!(a["reason"], "backfill the search index");
    assert_eq!(a["selection"]["from"], from.as_str());
    assert_eq!(a["selection"]["to"], to.as_str());
    assert_eq!(a["selection"]["until"], to.as_str());
    assert_eq!(a["selection"]["status"], "completed");
    assert_eq!(a["target_topic"], Value::Null);
    assert_eq!(a["rate_limit"], 100.0);
    assert_eq!(
        (
            a["selected"].as_i64(),
            a["sent"].as_i64(),
            a["refused"].as_i64()
        ),
        (Some(2), Some(2), Some(0))
    );
    assert_eq!(a["outcome"], "completed");
    assert!(a["finished_at"].is_string() && a["error"].is_null(), "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_topic_override_sends_everything_to_that_topic_and_nothing_to_the_routed_ones() {
    let outbox = TestOutbox::new("replay_topic").await;
    let order = insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "COMPLETED",
        5.0,
        &json!({"a": 1}),
    )
    .await;
    let cart = insert(
        &outbox,
        "Cart",
        Uuid::new_v4(),
        "CartOpened",
        "COMPLETED",
        4.0,
        &json!({"b": 2}),
    )
    .await;
    let target = format!("{}.replayed", outbox.topic_prefix);
    let report = ok_json(&replay(
        &outbox,
        &[
            "--topic",
            &target,
            "--reason",
            "seed the staging topic",
            "--json",
        ],
    ));
    assert_eq!(report["sent"], 2);
    assert_eq!(report["target_topic"], target.as_str());
    let got = read_raw(std::slice::from_ref(&target), 2);
    assert_eq!(got.len(), 2);
    let by_id: HashMap<String, &Raw> = got.iter().map(|r| (r.tracking_id(), r)).collect();
    let o = by_id[&order.to_string()];
    assert_eq!(o.header("aggregate_type").as_deref(), Some("Order"));
    assert_eq!(o.header("event_type").as_deref(), Some("OrderCreated"));
    assert_eq!(o.header("tenant").as_deref(), Some("acme"));
    assert_eq!(o.value.as_deref(), Some(&b"{\"a\": 1}"[..]));
    assert_eq!(
        by_id[&cart.to_string()].header("aggregate_type").as_deref(),
        Some("Cart")
    );
    assert_eq!(topic_record_count(&outbox.topic("Order")), 0);
    assert_eq!(topic_record_count(&outbox.topic("Cart")), 0);
    let a = &audit(&outbox).await[0];
    assert_eq!(a["target_topic"], target.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_counts_by_topic_and_samples_without_kafka_and_sends_nothing() {
    let mut outbox = TestOutbox::new("replay_dry").await;
    for i in 0..3 {
        insert(
            &outbox,
            "Order",
            Uuid::new_v4(),
            "OrderCreated",
            "COMPLETED",
            9.0 - f64::from(i),
            &json!({"i": i}),
        )
        .await;
    }
    for i in 0..7 {
        insert(
            &outbox,
            "Order",
            Uuid::new_v4(),
            "OrderPaid",
            "COMPLETED",
            5.0,
            &json!({"i": i}),
        )
        .await;
    }
    insert(
        &outbox,
        "Cart",
        Uuid::new_v4(),
        "CartOpened",
        "COMPLETED",
        5.0,
        &json!({}),
    )
    .await;
    insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderPaid",
        "PENDING",
        1.0,
        &json!({}),
    )
    .await;
    let before = row_states(&outbox).await;
    // No Kafka at all: a dry run never connects to it.
    outbox
        .env
        .push(("KAFKA_BROKERS".into(), "127.0.0.1:9".into()));
    let dry = ok_json(&replay(
        &outbox,
        &["--aggregate-type", "Order", "--dry-run", "--json"],
    ));
    assert_eq!(dry["selected"], 10, "COMPLETED Order rows only: {dry}");
    let counts: Vec<(String, String, i64)> = dry["by_topic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["topic"].as_str().unwrap().to_owned(),
                c["event_type"].as_str().unwrap().to_owned(),
                c["count"].as_i64().unwrap(),
            )
        })
        .collect();
    let topic = outbox.topic("Order");
    assert_eq!(
        counts,
        vec![
            (topic.clone(), "OrderPaid".to_owned(), 7),
            (topic.clone(), "OrderCreated".to_owned(), 3)
        ]
    );
    let sample = dry["sample"].as_array().unwrap();
    assert_eq!(sample.len(), 5);
    assert_eq!(sample[0]["value"], "{\"i\": 0}", "oldest first");
    assert_eq!(sample[0]["topic"], topic.as_str());
    assert!(sample[0]["headers"]
        .as_array()
        .unwrap()
        .contains(&json!("tracking_id")));
    // The text form says the same.
    let text = stdout(&replay(
        &outbox,
        &["--aggregate-type", "Order", "--dry-run"],
    ));
    assert!(text.starts_with("dry run: 10 events"), "{text}");
    assert!(text.contains("nothing was sent"), "{text}");
    // Over the limit: said, not refused.
    let dry = ok_json(&replay(
        &outbox,
        &["--dry-run", "--max-events", "5", "--json"],
    ));
    assert_eq!(dry["selected"], 11);
    assert_eq!(dry["over_max_events"], true);

    assert_eq!(topic_record_count(&topic), 0, "nothing was sent");
    assert!(audit(&outbox).await.is_empty(), "a dry run is not recorded");
    assert_eq!(row_states(&outbox).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rate_limit_paces_the_sends() {
    let outbox = TestOutbox::new("replay_rate").await;
    for i in 0..20 {
        insert(
            &outbox,
            "Order",
            Uuid::new_v4(),
            "OrderCreated",
            "COMPLETED",
            60.0 - f64::from(i),
            &json!({"i": i}),
        )
        .await;
    }
    let started = Instant::now();
    let report = ok_json(&replay(
        &outbox,
        &["--rate", "10", "--reason", "slow consumer", "--json"],
    ));
    let took = started.elapsed();
    assert_eq!(report["sent"], 20);
    // 20 events at 10/s: the 20th cannot go before 1.9 s after the first.
    assert!(took >= Duration::from_millis(1900), "took {took:?}");
    assert!(report["elapsed_s"].as_f64().unwrap() >= 1.9, "{report}");
    let records = read_topics(&[outbox.topic("Order")], DEADLINE, |r| r.len() >= 20);
    assert_eq!(records.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_replayed_as_they_are_and_stay_dead_lettered() {
    let mut outbox = TestOutbox::new("replay_dead").await;
    outbox.extra_config = "[kafka]\nmessage_max_bytes = 2000\n".into();
    let a = insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "DEAD_LETTER",
        9.0,
        &json!({"a": 1}),
    )
    .await;
    let b = insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "DEAD_LETTER",
        8.0,
        &json!({"b": 2}),
    )
    .await;
    let big = insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "DEAD_LETTER",
        7.0,
        &json!({"pad": "x".repeat(5000)}),
    )
    .await;
    let done = insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "COMPLETED",
        6.0,
        &json!({}),
    )
    .await;
    let before = row_states(&outbox).await;

    let out = replay(
        &outbox,
        &[
            "--status",
            "dead-letter",
            "--reason",
            "ACL fixed; consumers want them (INC-12)",
        ],
    );
    let line = refused(&out);
    assert!(
        line.contains("1 event could not be published") && line.contains(&big.to_string()),
        "{line}"
    );
    assert!(
        line.contains("exceeds kafka.message_max_bytes") && line.contains("the other 2 were sent"),
        "{line}"
    );
    assert!(stdout(&out).contains("replayed 2 of 3"), "{}", stdout(&out));

    let records = read_topics(&[outbox.topic("Order")], DEADLINE, |r| r.len() >= 2);
    let got: HashSet<String> = records
        .iter()
        .map(|r| r.header("tracking_id").to_owned())
        .collect();
    assert_eq!(got, [a, b].iter().map(Uuid::to_string).collect());
    assert!(!got.contains(&done.to_string()));
    assert_eq!(
        row_states(&outbox).await,
        before,
        "still DEAD_LETTER, nothing touched"
    );
    let entry = &audit(&outbox).await[0];
    assert_eq!(entry["selection"]["status"], "dead-letter");
    assert_eq!(
        (entry["sent"].as_i64(), entry["refused"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(entry["outcome"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_beside_a_running_relay_changes_no_row_locks_none_and_leaves_the_slot_alone() {
    let outbox = TestOutbox::new("replay_live").await;
    let relay = outbox.start_relay();
    let mut published = Vec::new();
    for n in 0..10 {
        published.push(
            outbox
                .publish("Order", Uuid::new_v4(), "OrderCreated", &json!({"n": n}))
                .await,
        );
    }
    wait_completed(&outbox, 10).await;
    let topic = outbox.topic("Order");
    read_raw(std::slice::from_ref(&topic), 10);
    let rows_before = row_states(&outbox).await;
    let (pid_before, flush_before) = slot(&outbox).await;
    assert!(pid_before.is_some(), "the relay streams from its slot");

    // Slow enough to look at while it runs.
    let mut cmd = outbox.admin_command();
    cmd.args([
        "replay",
        "--rate",
        "5",
        "--reason",
        "rebuild read model",
        "--json",
    ]);
    let running = tokio::task::spawn_blocking(move || cmd.output().expect("run pgoutbox replay"));
    wait_for("the replay to start sending", DEADLINE, || async {
        (topic_record_count(&topic) > 10).then_some(())
    })
    .await;
    // It holds no row lock: every row can be locked at once.
    let locked = outbox
        .client
        .query(
            &format!("SELECT id FROM {}.outbox FOR UPDATE NOWAIT", outbox.name),
            &[],
        )
        .await
        .expect("no replay lock on any row");
    assert_eq!(locked.len(), 10);
    let report = ok_json(&running.await.unwrap());
    assert_eq!(report["sent"], 10);

    assert_eq!(
        row_states(&outbox).await,
        rows_before,
        "no row changed, not even its version"
    );
    let (pid_after, flush_after) = slot(&outbox).await;
    assert_eq!(pid_after, pid_before, "the relay still holds its slot");
    assert!(flush_after >= flush_before, "the slot never moved back");
    // The relay published nothing because of the replay: each event once
    // unmarked (its first delivery) and once marked.
    let records = read_raw(std::slice::from_ref(&topic), 20);
    assert_eq!(records.len(), 20);
    let unmarked: Vec<String> = records
        .iter()
        .filter(|r| r.header("pgoutbox_replay").is_none())
        .map(Raw::tracking_id)
        .collect();
    assert_eq!(unmarked.len(), 10);
    assert_eq!(unmarked.iter().collect::<HashSet<_>>().len(), 10);
    // And it goes on relaying.
    let next = outbox
        .publish("Order", Uuid::new_v4(), "OrderCreated", &json!({"n": 10}))
        .await;
    wait_completed(&outbox, 11).await;
    let records = read_raw(std::slice::from_ref(&topic), 21);
    let last: Vec<&Raw> = records
        .iter()
        .filter(|r| r.tracking_id() == next.to_string())
        .collect();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].header("pgoutbox_replay"), None);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signal_stops_a_replay_and_the_audit_says_how_many_were_sent() {
    let outbox = TestOutbox::new("replay_signal").await;
    for i in 0..40 {
        insert(
            &outbox,
            "Order",
            Uuid::new_v4(),
            "OrderCreated",
            "COMPLETED",
            60.0 - f64::from(i),
            &json!({"i": i}),
        )
        .await;
    }
    let topic = outbox.topic("Order");
    let mut cmd = outbox.admin_command();
    cmd.args(["replay", "--rate", "10", "--reason", "will be stopped"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("spawn pgoutbox replay");
    wait_for("a few replayed records", DEADLINE, || async {
        (topic_record_count(&topic) >= 5).then_some(())
    })
    .await;
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let line = refused(&out);
    assert!(
        line.contains("interrupted") && line.contains("rerunning the same selection is safe"),
        "{line}"
    );
    let entry = &audit(&outbox).await[0];
    assert_eq!(entry["outcome"], "interrupted");
    let sent = entry["sent"].as_i64().unwrap();
    assert!((5..40).contains(&sent), "{entry}");
    assert_eq!(
        topic_record_count(&topic),
        sent,
        "the audit counts exactly what Kafka has"
    );
    assert!(line.contains(&format!("{sent} of 40")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_selections_are_refused_in_one_line_before_anything_is_sent() {
    let mut outbox = TestOutbox::new("replay_refused").await;
    insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "COMPLETED",
        5.0,
        &json!({}),
    )
    .await;
    insert(
        &outbox,
        "Order",
        Uuid::new_v4(),
        "OrderCreated",
        "COMPLETED",
        4.0,
        &json!({}),
    )
    .await;
    let reason = ["--reason", "testing refusals"];
    let setval = format!("setval('{}.outbox_id_seq', 1) > 0", outbox.name);
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec![], vec!["--reason", "blind replay"]),
        (vec!["--reason", "  "], vec!["--reason"]),
        (
            vec![
                "--from",
                "2026-12-03T10:00:00Z",
                "--to",
                "2026-12-03T09:00:00Z",
            ],
            vec!["--from", "is not before --to"],
        ),
        (
            vec!["--status", "pending"],
            vec!["--status", "completed or dead-letter"],
        ),
        (vec!["--from", "yesterday"], vec!["--from", "RFC 3339"]),
        (
            vec!["--to", "2026-12-03T10:00:00"],
            vec!["--to", "no time zone"],
        ),
        (
            vec!["--where", "true; DELETE FROM outbox"],
            vec!["--where refused"],
        ),
        (
            vec!["--where", "no_such_column = 1"],
            vec!["--where", "no_such_column"],
        ),
        (vec!["--where", &setval], vec!["--where", "read-only"]),
        (
            vec!["--aggregate-id", "not-a-uuid"],
            vec!["--aggregate-id", "not a UUID"],
        ),
        (vec!["--event-type", ""], vec!["--event-type", "empty"]),
        (vec!["--topic", "bad topic!"], vec!["--topic"]),
        (vec!["--rate", "0"], vec!["--rate"]),
        (vec!["--rate", "fast"], vec!["--rate"]),
        (
            vec!["--event-type", "NoSuchEvent"],
            vec!["nothing to replay", "nothing was sent"],
        ),
        (
            vec!["--max-events", "1"],
            vec!["holds 2 events", "--max-events 2"],
        ),
    ];
    for (args, wanted) in cases {
        let mut full: Vec<&str> = args.clone();
        if !args.contains(&"--reason") && !wanted.contains(&"blind replay") {
            full.extend_from_slice(&reason);
        }
        let line = refused(&replay(&outbox, &full));
        for w in wanted {
            assert!(line.contains(w), "{args:?}: {line:?} lacks {w:?}");
        }
    }
    // Kafka unreachable: refused before anything is sent or recorded.
    outbox.env.push((
        "KAFKA_BROKERS".into(),
        format!("127.0.0.1:{}", common::harness::free_port()),
    ));
    let line = refused(&replay(&outbox, &reason));
    assert!(
        line.contains("did not answer") && line.contains("nothing was sent"),
        "{line}"
    );
    assert!(
        audit(&outbox).await.is_empty(),
        "no refused replay is recorded"
    );
}

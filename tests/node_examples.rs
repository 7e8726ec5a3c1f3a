//! The TypeScript examples in `examples/node`, run with `node` against the
//! real PostgreSQL, relay and Kafka, so they cannot rot: the producers
//! publish inside their business transactions (`outbox_publish` and the raw
//! INSERT an ORM would send), a rolled-back transaction publishes nothing,
//! and the kafkajs consumer applies every event exactly once although it
//! is delivered twice.
//!
//! Node.js and npm are required, not optional: without them the test fails,
//! naming `scripts/install-deps npm`. `npm ci` runs here when
//! `examples/node/node_modules` is missing or older than the lock file, then
//! `tsc` builds `examples/node/dist` (both git-ignored).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::harness::{read_until_all, run_with_timeout, Record, TestOutbox};
use common::services;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use uuid::Uuid;

/// `examples/node`.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The command's output, or a panic naming `what` with its stderr.
fn succeed(what: &str, cmd: Command, timeout: Duration) -> Output {
    let out = run_with_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// A tool's `--version`, or `None` when it cannot be run.
fn version_of(tool: &str) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| text(&out.stdout).trim().to_owned())
}

/// Installs (`npm ci`, when needed) and compiles the examples once per test
/// binary.
fn build_examples() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = example_dir();
        let node = version_of("node");
        let npm = version_of("npm");
        let (Some(node), Some(_npm)) = (node, npm) else {
            panic!(
                "tests/node_examples.rs needs Node.js (>= 18) and npm on PATH: \
                 install them with `scripts/install-deps npm`"
            );
        };
        let major: u32 = node
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        assert!(
            major >= 18,
            "examples/node needs Node.js >= 18, found {node}: `scripts/install-deps npm` or a newer node on PATH"
        );

        // npm ci when node_modules is missing or older than the lock file
        // (npm writes node_modules/.package-lock.json at every install).
        let installed = dir.join("node_modules/.package-lock.json");
        let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
        let stale = match (modified(&installed), modified(&dir.join("package-lock.json"))) {
            (Some(installed), Some(lock)) => installed < lock,
            _ => true,
        };
        if stale {
            let started = Instant::now();
            let mut cmd = Command::new("npm");
            cmd.args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&dir);
            let out = run_with_timeout(cmd, Duration::from_secs(600));
            assert!(
                out.status.success(),
                "`npm ci` in {} failed ({}); it needs the npm registry (or a configured mirror) \
                 and a package-lock.json matching package.json:\n{}",
                dir.display(),
                out.status,
                text(&out.stderr)
            );
            eprintln!("node_examples: npm ci took {:?}", started.elapsed());
        }

        let mut tsc = Command::new("node");
        tsc.arg("node_modules/typescript/bin/tsc")
            .args(["-p", "."])
            .current_dir(&dir);
        let out = run_with_timeout(tsc, Duration::from_secs(300));
        assert!(
            out.status.success(),
            "tsc in {} failed: the TypeScript examples do not compile:\n{}{}",
            dir.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
        dir.join("dist")
    })
}

/// `node dist/<script>.js args` with the environment an application would
/// have: the services, and the test's schema as OUTBOX_SCHEMA.
fn node(outbox: &TestOutbox, script: &str, args: &[&str]) -> Command {
    let dist = build_examples();
    let s = services();
    let mut cmd = Command::new("node");
    cmd.arg(dist.join(format!("{script}.js")))
        .args(args)
        .current_dir(example_dir())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &s.database_url)
        .env("KAFKA_BROKERS", &s.kafka_brokers)
        .env("OUTBOX_SCHEMA", &outbox.name);
    cmd
}

/// The JSON lines a producer printed, one per business transaction.
fn json_lines(out: &Output) -> Vec<Value> {
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("producer line {l:?}: {e}")))
        .collect()
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name} in {v}"))
}

/// Runs the consumer with `group` until it handled `events` records; returns
/// (applied, duplicates) from its summary line and the ids it applied.
fn consume(outbox: &TestOutbox, group: &str, events: usize) -> (usize, usize, Vec<Uuid>) {
    let mut cmd = node(outbox, "consumer", &[]);
    cmd.env("CONSUMER_TOPICS", outbox.topic("Order"))
        .env("CONSUMER_GROUP", group)
        .env("CONSUMER_MAX_EVENTS", events.to_string())
        .env("CONSUMER_IDLE_EXIT_MS", "60000");
    let out = succeed("the example consumer", cmd, Duration::from_secs(120));
    let stdout = text(&out.stdout);
    let summary = stdout
        .lines()
        .find_map(|l| l.strip_prefix("done: "))
        .unwrap_or_else(|| panic!("no summary line from the consumer:\n{stdout}"));
    let numbers: Vec<usize> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let applied_ids = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("applied "))
        .map(|l| Uuid::parse_str(l.split(' ').next().unwrap()).expect("applied id"))
        .collect();
    (numbers[0], numbers[1], applied_ids)
}

/// Publishes `record` again, headers and all: the redelivery at-least-once
/// allows (a relay restarted before it recorded its progress).
async fn redeliver(record: &Record) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka_brokers)
        .create()
        .expect("create producer");
    let mut headers = rdkafka::message::OwnedHeaders::new();
    for (key, value) in &record.headers {
        headers = headers.insert(rdkafka::message::Header {
            key,
            value: Some(value),
        });
    }
    producer
        .send(
            FutureRecord::to(&record.topic)
                .key(&record.key)
                .payload(&record.value)
                .headers(headers),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("redeliver a record");
}

/// Moves `group`'s committed offsets on `topic` back to 0: every record is
/// delivered again, as after a crash between the consumer's database
/// commits and its offset commits.
fn rewind(group: &str, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka_brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("create consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Offset(0))
            .unwrap();
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("rewind offsets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_producers_and_consumer_deliver_each_event_once() {
    // Compiled before the outbox exists, so a broken toolchain fails first
    // and plainly.
    if let Err(e) = tokio::task::spawn_blocking(build_examples).await {
        std::panic::resume_unwind(e.into_panic());
    }
    let outbox = TestOutbox::new("node_examples").await;
    let schema = &outbox.name;
    let relay = outbox.start_relay();

    // producer.ts: three orders of alice (credit 100): 30 and 50 commit,
    // 500 fails its credit check after its event was written.
    let mut cmd = node(&outbox, "producer", &["alice", "30", "50", "500"]);
    cmd.env("DEMO_CREDIT", "100");
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(1),
        "producer: one order must roll back:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let orders = json_lines(&out);
    assert_eq!(orders.len(), 3, "one line per order: {orders:?}");
    let committed: Vec<&Value> = orders.iter().filter(|o| o["committed"] == true).collect();
    let rolled_back: Vec<&Value> = orders.iter().filter(|o| o["committed"] == false).collect();
    assert_eq!(
        committed
            .iter()
            .map(|o| o["total"].as_f64())
            .collect::<Vec<_>>(),
        [Some(30.0), Some(50.0)]
    );
    assert_eq!(rolled_back.len(), 1);
    assert!(
        field(rolled_back[0], "error").contains("customers_credit_check"),
        "rolled back by the credit check: {}",
        rolled_back[0]
    );
    let first_order = field(committed[0], "orderId").to_owned();

    // producer-raw-sql.ts: the first order cancelled through the plain
    // INSERT; cancelling the rolled-back order fails (it does not exist).
    let lost_order = field(rolled_back[0], "orderId").to_owned();
    let out = run_with_timeout(
        node(&outbox, "producer-raw-sql", &[&first_order, &lost_order]),
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "producer-raw-sql: the second cancellation must roll back:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let cancels = json_lines(&out);
    assert_eq!(cancels.len(), 2, "{cancels:?}");
    assert_eq!(cancels[0]["committed"], true, "{}", cancels[0]);
    assert_eq!(cancels[1]["committed"], false, "{}", cancels[1]);

    // Expected events, by tracking id: (order, event type, ledger amount).
    let mut expected: BTreeMap<Uuid, (String, &str, f64)> = BTreeMap::new();
    for o in &committed {
        let amount = o["total"].as_f64().unwrap();
        expected.insert(
            field(o, "trackingId").parse().unwrap(),
            (field(o, "orderId").to_owned(), "OrderCreated", amount),
        );
    }
    expected.insert(
        field(&cancels[0], "trackingId").parse().unwrap(),
        (first_order.clone(), "OrderCancelled", -30.0),
    );
    let ids: Vec<Uuid> = expected.keys().copied().collect();

    // The database: exactly the committed orders and events.
    let c = &outbox.client;
    let outbox_rows: BTreeSet<Uuid> = c
        .query(&format!("SELECT tracking_id FROM {schema}.outbox"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        outbox_rows,
        ids.iter().copied().collect(),
        "the outbox holds the committed events only"
    );
    let lost: Uuid = lost_order.parse().unwrap();
    let leftovers: i64 = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.orders WHERE id = $1) \
                      + (SELECT count(*) FROM {schema}.outbox WHERE aggregate_id = $1)"
            ),
            &[&lost],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leftovers, 0,
        "the rolled-back order left an order or an event"
    );
    let credit: String = c
        .query_one(
            &format!("SELECT credit::text FROM {schema}.customers WHERE id = 'alice'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(credit.parse::<f64>().unwrap(), 100.0 - 30.0 - 50.0 + 30.0);

    // Kafka: the relay published the three events as the examples expect.
    let topic = outbox.topic("Order");
    let records = read_until_all(vec![topic.clone()], ids.clone(), Duration::from_secs(60)).await;
    assert_eq!(records.len(), 3, "{records:?}");
    for r in &records {
        let id: Uuid = r.header("tracking_id").parse().unwrap();
        let (order, event_type, _) = &expected[&id];
        assert_eq!(&r.key, order, "key = the order id");
        assert_eq!(r.header("event_type"), *event_type);
        let payload: Value = serde_json::from_str(&r.value).expect("payload is JSON");
        assert_eq!(payload["orderId"], order.as_str());
    }
    let created_record = records
        .iter()
        .find(|r| r.header("event_type") == "OrderCreated")
        .unwrap();
    assert_eq!(
        created_record.header("schema_version"),
        "1",
        "outbox_publish's metadata as a header"
    );

    // A duplicate delivery of the first event, then the consumer: three
    // applied, the copy skipped.
    redeliver(created_record).await;
    let group = format!("{}-ledger", outbox.topic_prefix);
    let g = group.clone();
    let (applied, duplicates, applied_ids) = {
        let outbox = &outbox;
        tokio::task::block_in_place(|| consume(outbox, &g, 4))
    };
    assert_eq!(
        (applied, duplicates),
        (3, 1),
        "first run: 3 applied, the redelivered copy skipped"
    );
    assert_eq!(
        applied_ids.iter().copied().collect::<BTreeSet<_>>(),
        ids.iter().copied().collect()
    );

    // Every record again (offsets rewound): all skipped.
    let (g, t) = (group.clone(), topic.clone());
    tokio::task::spawn_blocking(move || rewind(&g, &t))
        .await
        .unwrap();
    let (applied, duplicates, _) = {
        let outbox = &outbox;
        tokio::task::block_in_place(|| consume(outbox, &group, 4))
    };
    assert_eq!(
        (applied, duplicates),
        (0, 4),
        "second run from offset 0: everything is a duplicate"
    );

    // Exactly once in PostgreSQL: one marker and one ledger row per event.
    let mut markers: Vec<Uuid> = c
        .query(
            &format!(
                "SELECT tracking_id FROM {schema}.processed_events WHERE consumer_group = $1 ORDER BY 1"
            ),
            &[&group],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    markers.sort();
    assert_eq!(markers, ids, "one processed_events row per event");
    let rows = c
        .query(
            &format!(
                "SELECT tracking_id, order_id::text, event_type, amount::float8 \
                   FROM {schema}.order_ledger ORDER BY tracking_id"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "one ledger row per event, none twice");
    let ledger: BTreeMap<Uuid, (String, String, f64)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for (id, (order, event_type, amount)) in &expected {
        assert_eq!(
            ledger.get(id),
            Some(&(order.clone(), (*event_type).to_owned(), *amount)),
            "the handler's row for {id}"
        );
    }

    assert!(relay.terminate().success());
}

//! Exactly-once delivery (`kafka.delivery = "exactly-once"`), proven by the
//! ledger read back with an independent `read_committed` consumer: every
//! committed row exactly once, in per-aggregate order, nothing of a
//! rolled-back transaction — through relay SIGKILLs, a crash between the
//! Kafka commit and the marks, a crash in the first backfill, a lost slot,
//! and an old relay that wakes up after another took over. Each scenario
//! also reads the topic with `read_uncommitted` and prints what exactly-once
//! kept from `read_committed` readers (records of aborted transactions):
//! `LEDGER eos-<scenario>: …` lines, quoted in docs/RELIABILITY.md.
//!
//! The scenarios restart PostgreSQL and the broker other tests use, so they
//! run one at a time (a lock) in their own binary. `PGOUTBOX_FAULT_CYCLES`
//! sets the number of SIGKILLs (default 5 in CI; the reliability suite uses
//! 20); `PGOUTBOX_EOS_SUITE=full` adds the long scenarios (the broker down
//! past the transaction timeout, a 1,000,000-row transaction instead of
//! 100,000).

mod common;

use std::time::Duration;

use common::control::{services, KafkaBack};
use common::harness::{read_topics_as, read_until_all_as, wait_for, Isolation, Relay, TestOutbox};
use common::ledger::{self, Load, LoadResult, Written};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const DEADLINE: Duration = Duration::from_secs(180);

/// Whether the long scenarios run (`PGOUTBOX_EOS_SUITE=full`).
fn full() -> bool {
    std::env::var("PGOUTBOX_EOS_SUITE").is_ok_and(|v| v == "full")
}

fn cycles() -> usize {
    std::env::var("PGOUTBOX_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

/// An outbox whose relays deliver exactly once, with a progress topic of
/// the test's own.
async fn outbox(name: &str) -> TestOutbox {
    let mut outbox = TestOutbox::new(name).await;
    let progress = format!("{}.progress", outbox.topic_prefix);
    outbox.env.extend([
        ("OUTBOX_DELIVERY".to_owned(), "exactly-once".to_owned()),
        ("KAFKA_PROGRESS_TOPIC".to_owned(), progress),
    ]);
    outbox
}

/// Waits until every row of the outbox is COMPLETED.
async fn all_rows_completed(outbox: &TestOutbox) {
    wait_for("every row COMPLETED", DEADLINE, || async {
        let s = outbox.statuses().await;
        (s.len() == 1 && s.contains_key("COMPLETED")).then_some(())
    })
    .await;
}

/// Rows with `status`.
async fn rows_with(outbox: &TestOutbox, status: &str) -> i64 {
    outbox.statuses().await.get(status).copied().unwrap_or(0)
}

/// The ledger read with `read_committed` (no duplicate is explained: there
/// must be none), plus the records a `read_uncommitted` reader sees, which
/// include those of aborted transactions.
async fn finish(outbox: &TestOutbox, scenario: &str, load: &LoadResult) -> ledger::Report {
    all_rows_completed(outbox).await;
    let topics = vec![outbox.topic("Order")];
    let report = ledger::check_as(
        outbox,
        topics.clone(),
        load,
        DEADLINE,
        Some(Isolation::ReadCommitted),
        |_: &Written| false,
    )
    .await;
    let committed = report.records;
    let uncommitted = tokio::task::spawn_blocking(move || {
        read_topics_as(
            &topics,
            DEADLINE,
            Some(Isolation::ReadUncommitted),
            |recs| recs.len() >= committed,
        )
        .len()
    })
    .await
    .expect("reader");
    eprintln!(
        "LEDGER eos-{scenario}: {report}; read_uncommitted sees {uncommitted} records ({} of aborted transactions kept from read_committed readers)",
        uncommitted.saturating_sub(committed)
    );
    report
}

/// Every row of the outbox as the load to check (rows written by the test
/// itself, not by a `Load`).
async fn table_as_load(outbox: &TestOutbox) -> LoadResult {
    let rows = outbox
        .client
        .query(
            &format!("SELECT tracking_id FROM {}.outbox", outbox.name),
            &[],
        )
        .await
        .unwrap();
    LoadResult {
        committed: rows
            .iter()
            .map(|r| Written {
                tracking_id: r.get(0),
                xid: 0,
            })
            .collect(),
        ..LoadResult::default()
    }
}

/// Panics unless the ledger is exact: every row once, in order, nothing
/// rolled back or unknown.
fn assert_exactly_once(report: &ledger::Report) {
    report.assert_clean(true);
    assert_eq!(report.duplicates, 0, "duplicates: {report}");
    assert_eq!(report.records, report.rows, "{report}");
}

/// Scenario 1: SIGKILLs at random moments under continuous inserts; every
/// restart resumes from the progress topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkills_at_random_moments_deliver_every_event_exactly_once() {
    let _serial = SERIAL.lock().await;
    let outbox = outbox("eos_kill").await;
    let load = Load::start(&outbox.name, "Order", 50, Duration::from_millis(2));
    let mut relay = outbox.start_relay();
    for _ in 0..cycles() {
        let before = rows_with(&outbox, "COMPLETED").await;
        wait_for("the relay to deliver more", DEADLINE, || async {
            (rows_with(&outbox, "COMPLETED").await > before).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 1500)).await;
        relay.kill();
        relay = outbox.start_relay();
    }
    let written = load.stop().await;
    let report = finish(&outbox, "relay-sigkill", &written).await;
    assert_exactly_once(&report);
    // `pgoutbox status` shows what Kafka holds for this stream.
    let out = outbox.run_ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let delivery = &status["delivery"];
    assert_eq!(delivery["guarantee"], "exactly-once", "{status}");
    assert_eq!(delivery["committed"]["slot"], outbox.slot(), "{status}");
    assert!(delivery["committed"]["lsn"].is_string(), "{status}");
    let text = String::from_utf8_lossy(&outbox.run_ok(&["status"]).stdout).into_owned();
    assert!(
        text.contains("delivery    exactly-once; Kafka holds up to"),
        "{text}"
    );
    let log = relay.log_text();
    assert!(relay.running(), "{log}");
    relay.terminate();
}

/// Publishes `n` single-event transactions of aggregate type Order.
async fn publish(outbox: &TestOutbox, n: usize) -> LoadResult {
    let mut out = LoadResult::default();
    let sql = format!(
        "SELECT {}.outbox_publish('Order', $1, 'Happened', $2)",
        outbox.name
    );
    let agg = uuid::Uuid::new_v4();
    for seq in 0..n {
        let payload = serde_json::json!({ "seq": seq });
        let id: uuid::Uuid = outbox
            .client
            .query_one(&sql, &[&agg, &payload])
            .await
            .unwrap()
            .get(0);
        out.committed.push(Written {
            tracking_id: id,
            xid: 0,
        });
    }
    out
}

/// The records of the test's topic a `read_committed` reader sees.
async fn committed_records(outbox: &TestOutbox, at_least: usize) -> usize {
    let topics = vec![outbox.topic("Order")];
    tokio::task::spawn_blocking(move || {
        read_topics_as(&topics, DEADLINE, Some(Isolation::ReadCommitted), |recs| {
            recs.len() >= at_least
        })
        .len()
    })
    .await
    .expect("reader")
}

/// Scenario 2: SIGKILL after a Kafka transaction committed but before its
/// rows' COMPLETED marks (held back by a lock) and the slot confirmation.
/// The replay skips them, and still marks them. With `lose_slot`, the slot
/// is dropped as well: the new slot's backfill finds them PENDING and must
/// tell them from undelivered rows by the progress record.
async fn kill_between_commit_and_mark(name: &str, lose_slot: bool) {
    let outbox = outbox(name).await;
    let relay = outbox.start_relay();
    let mut written = publish(&outbox, 20).await;
    all_rows_completed(&outbox).await;
    let holder = outbox.hold_marks(&["outbox"]).await;
    let held = publish(&outbox, 30).await;
    written.committed.extend(held.committed);
    // Kafka transactions with some of the 30 committed (read_committed
    // readers see them) while their marks wait on the lock; later commits
    // do not wait for those marks, and each progress record lists every
    // row still unmarked.
    let visible = committed_records(&outbox, 21).await;
    assert_eq!(rows_with(&outbox, "PENDING").await, 30);
    relay.kill();
    eprintln!(
        "{name}: killed with {} of the 30 committed in Kafka and none marked",
        visible - 20
    );
    drop(holder);
    if lose_slot {
        outbox.drop_slot().await;
    }
    let mut args = vec!["run"];
    if lose_slot {
        args.push("--recreate-slot");
    }
    let relay = Relay::spawn(outbox.command_with_args(&args), &outbox.name);
    all_rows_completed(&outbox).await;
    let after = publish(&outbox, 10).await;
    written.committed.extend(after.committed);
    let scenario = if lose_slot {
        "kill-commit-mark-slot-lost"
    } else {
        "kill-commit-mark"
    };
    let report = finish(&outbox, scenario, &written).await;
    assert_exactly_once(&report);
    relay.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_between_the_kafka_commit_and_the_marks_sends_nothing_twice() {
    let _serial = SERIAL.lock().await;
    kill_between_commit_and_mark("eos_mark", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_slot_backfills_only_what_kafka_does_not_have() {
    let _serial = SERIAL.lock().await;
    kill_between_commit_and_mark("eos_slot", true).await;
}

/// Scenario 3: SIGKILL in the middle of the first backfill (many Kafka
/// transactions of 500 rows); the next run backfills from a new snapshot
/// and sends only the rows Kafka does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_in_the_middle_of_the_first_backfill_sends_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_backfill").await;
    outbox.env.extend([
        ("KAFKA_TRANSACTION_MAX_EVENTS".to_owned(), "500".to_owned()),
        ("KAFKA_LINGER_MS".to_owned(), "20".to_owned()),
    ]);
    let s = &outbox.name;
    outbox
        .client
        .batch_execute(&format!(
            "SELECT {s}.outbox_publish('Order', gen_random_uuid(), 'Happened', jsonb_build_object('seq', 0)) FROM generate_series(1, 30000)"
        ))
        .await
        .unwrap();
    let relay = outbox.start_relay();
    wait_for("part of the backfill delivered", DEADLINE, || async {
        (rows_with(&outbox, "COMPLETED").await >= 3000).then_some(())
    })
    .await;
    let completed = rows_with(&outbox, "COMPLETED").await;
    relay.kill();
    assert!(
        completed < 30_000,
        "the backfill finished before the kill ({completed} rows)"
    );
    let relay = outbox.start_relay();
    let load = table_as_load(&outbox).await;
    let report = finish(&outbox, "kill-mid-backfill", &load).await;
    eprintln!("killed with {completed} of 30000 rows COMPLETED");
    assert_exactly_once(&report);
    relay.terminate();
}

/// Scenario 4: the serving relay is frozen (SIGSTOP) and cut off from its
/// slot; a second relay takes over, fencing the first at the broker. When
/// the first wakes up (SIGCONT) nothing it sends reaches `read_committed`
/// readers, and it stands by.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_relay_that_wakes_up_after_a_takeover_is_fenced() {
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_fence").await;
    // Long transactions: the frozen relay holds one open when it wakes.
    outbox.env.push((
        "KAFKA_TRANSACTION_INTERVAL_MS".to_owned(),
        "2000".to_owned(),
    ));
    let load = Load::start(&outbox.name, "Order", 20, Duration::from_millis(3));
    let old = outbox.start_relay();
    // Streaming, not still in its first backfill (which marks rows too,
    // before any walsender streams): the freeze must catch a relay whose
    // replication connection PostgreSQL then ends.
    wait_for(
        "the first relay to deliver and stream",
        DEADLINE,
        || async {
            (rows_with(&outbox, "COMPLETED").await > 100
                && common::control::walsender(&outbox.client, &outbox.slot())
                    .await
                    .is_some())
            .then_some(())
        },
    )
    .await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(old.pid() as i32, libc::SIGSTOP) };
    // The network partition: the frozen relay's sessions (its walsender,
    // its serving lock, its mark writer) go away, as PostgreSQL would end
    // them once TCP keepalives or wal_sender_timeout gave up on it.
    common::control::walsender(&outbox.client, &outbox.slot())
        .await
        .expect("the first relay streams");
    outbox
        .client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
              WHERE usename = 'pgoutbox_relay' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let new = outbox.start_relay();
    let before = rows_with(&outbox, "COMPLETED").await;
    wait_for("the second relay to deliver", DEADLINE, || async {
        (rows_with(&outbox, "COMPLETED").await > before + 100).then_some(())
    })
    .await;
    // SAFETY: as above.
    unsafe { libc::kill(old.pid() as i32, libc::SIGCONT) };
    wait_for("the old relay to learn it was fenced", DEADLINE, || async {
        let log = old.log_text();
        (log.contains("fenced") || log.contains("standing by")).then_some(())
    })
    .await;
    let written = load.stop().await;
    let report = finish(&outbox, "fenced-zombie", &written).await;
    assert_exactly_once(&report);
    let log = old.log_text();
    assert!(
        log.contains("another relay with the same transactional.id"),
        "{log}"
    );
    drop(old);
    new.terminate();
}

/// Misuse: a progress topic that is not compacted, a transaction timeout
/// above the brokers' limit, and a progress record of another slot (under
/// a shared `transactional.id`) each stop the relay at start with what to
/// do; `--reset-progress` then starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_progress_topic_or_timeout_is_refused_at_start_with_what_to_do() {
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_misuse").await;
    let deleting = format!("{}.progress-deleting", outbox.topic_prefix);
    common::harness::create_topic(&deleting).await;
    let mut cmd = outbox.command_with_args(&["run"]);
    cmd.env("KAFKA_PROGRESS_TOPIC", &deleting);
    let (status, log) = Relay::spawn(cmd, &outbox.name).wait_exit(DEADLINE);
    assert!(!status.success(), "{log}");
    assert!(log.contains("cleanup.policy=compact"), "{log}");

    outbox.extra_config = "[kafka]\ntransaction_timeout_ms = 3000000\n".into();
    let (status, log) =
        Relay::spawn(outbox.command_with_args(&["run"]), &outbox.name).wait_exit(DEADLINE);
    assert!(!status.success(), "{log}");
    assert!(log.contains("transaction.max.timeout.ms"), "{log}");
    outbox.extra_config.clear();

    // Two slots under one transactional.id: the second finds the first's
    // record.
    let shared = format!("{}-shared", outbox.topic_prefix);
    outbox
        .env
        .push(("KAFKA_TRANSACTIONAL_ID".to_owned(), shared.clone()));
    let relay = outbox.start_relay();
    publish(&outbox, 5).await;
    all_rows_completed(&outbox).await;
    relay.terminate();
    outbox
        .env
        .push(("OUTBOX_SLOT".to_owned(), format!("{}_other", outbox.name)));
    let (status, log) =
        Relay::spawn(outbox.command_with_args(&["run"]), &outbox.name).wait_exit(DEADLINE);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("written for slot") && log.contains("--reset-progress"),
        "{log}"
    );
    let relay = Relay::spawn(
        outbox.command_with_args(&["run", "--reset-progress"]),
        &outbox.name,
    );
    wait_for("the reset relay to serve", DEADLINE, || async {
        relay
            .log_text()
            .contains("ignoring the progress record of another stream")
            .then_some(())
    })
    .await;
    relay.terminate();
    common::harness::drop_slots_when_released(
        vec![format!("{}_other", outbox.name)],
        Duration::from_secs(5),
    );
}

/// Runs `fault` under continuous load once the relay delivers, then checks
/// the ledger is exact.
async fn under_load(mut outbox: TestOutbox, scenario: &str, fault: impl AsyncFnOnce()) {
    let load = Load::start(&outbox.name, "Order", 50, Duration::from_millis(3));
    let relay = outbox.start_relay();
    wait_for("the relay to deliver", DEADLINE, || async {
        (rows_with(&outbox, "COMPLETED").await > 200).then_some(())
    })
    .await;
    fault().await;
    // The test's own connection may not have survived the fault.
    outbox.client = common::harness::connect().await;
    let before = rows_with(&outbox, "COMPLETED").await;
    wait_for("the relay to deliver again", DEADLINE, || async {
        (rows_with(&outbox, "COMPLETED").await > before + 200).then_some(())
    })
    .await;
    let written = load.stop().await;
    let report = finish(&outbox, scenario, &written).await;
    assert_exactly_once(&report);
    let mut relay = relay;
    assert!(relay.running(), "{}", relay.log_text());
    relay.terminate();
}

/// Scenario 5: PostgreSQL restarted with `-m immediate` under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_immediately_under_load_still_delivers_exactly_once() {
    let _serial = SERIAL.lock().await;
    let outbox = outbox("eos_pg_restart").await;
    under_load(outbox, "pg-restart-immediate", async || {
        services("pg-restart", Some("immediate"));
    })
    .await;
}

/// Scenario 6: the broker SIGKILLed and restarted under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_sigkilled_and_restarted_under_load_still_delivers_exactly_once() {
    let _serial = SERIAL.lock().await;
    let outbox = outbox("eos_kafka_kill").await;
    under_load(outbox, "kafka-sigkill", async || {
        let back = KafkaBack;
        services("kafka-stop", Some("kill"));
        drop(back);
    })
    .await;
}

/// Scenario 7 (full suite): the broker stopped for longer than the
/// transaction timeout (5 s here): the open transaction cannot commit, is
/// aborted, and the relay resumes from the last committed position once
/// the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_broker_down_longer_than_the_transaction_timeout_still_delivers_exactly_once() {
    if !full() {
        eprintln!("skipped: PGOUTBOX_EOS_SUITE=full runs it (the broker is down for 20 s)");
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_kafka_down").await;
    outbox.extra_config = "[kafka]\ntransaction_timeout_ms = 5000\n".into();
    under_load(outbox, "kafka-down-past-transaction-timeout", async || {
        let back = KafkaBack;
        services("kafka-stop", None);
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(back);
    })
    .await;
}

/// Scenario 8: SIGKILL half-way through one large PostgreSQL transaction
/// (100,000 rows; 1,000,000 in the full suite), which goes out in many
/// Kafka transactions: the replay skips the part Kafka has, by index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_half_way_through_a_large_transaction_sends_nothing_twice() {
    let _serial = SERIAL.lock().await;
    let rows: i64 = if full() { 1_000_000 } else { 100_000 };
    let outbox = outbox("eos_large").await;
    let relay = outbox.start_relay();
    publish(&outbox, 10).await;
    all_rows_completed(&outbox).await;
    let s = &outbox.name;
    // Ten aggregates, each row's seq increasing within its aggregate.
    outbox
        .client
        .batch_execute(&format!(
            "WITH a AS (SELECT array_agg(gen_random_uuid()) AS ids FROM generate_series(1, 10)) \
             SELECT {s}.outbox_publish('Order', a.ids[g % 10 + 1], 'Happened', jsonb_build_object('seq', g / 10)) \
               FROM a, generate_series(0, {rows} - 1) g"
        ))
        .await
        .unwrap();
    wait_for(
        "a quarter of the large transaction delivered",
        DEADLINE,
        || async { (rows_with(&outbox, "COMPLETED").await >= 10 + rows / 4).then_some(()) },
    )
    .await;
    let completed = rows_with(&outbox, "COMPLETED").await;
    relay.kill();
    assert!(
        completed < rows + 10,
        "the transaction was fully delivered before the kill"
    );
    let relay = outbox.start_relay();
    let load = table_as_load(&outbox).await;
    let report = finish(&outbox, &format!("kill-mid-{rows}-row-transaction"), &load).await;
    eprintln!("killed with {completed} of {} rows COMPLETED", rows + 10);
    assert_exactly_once(&report);
    relay.terminate();
}

/// Point 9 of the design: a row that can never be published stays
/// DEAD_LETTER (a replay marks only PENDING rows COMPLETED), and logical
/// messages (the table-less outbox) go out exactly once like rows, across
/// a SIGKILL right after the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_and_logical_messages_keep_their_fate_across_a_replay() {
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_fates").await;
    outbox.extra_config = "[kafka]\nmessage_max_bytes = 2000\n".into();
    let relay = outbox.start_relay();
    // Logical messages are not in any table: only a streaming slot sees them.
    wait_for("the relay's slot to stream", DEADLINE, || async {
        common::control::walsender(&outbox.client, &outbox.slot())
            .await
            .map(|_| ())
    })
    .await;
    let s = outbox.name.clone();
    let agg = uuid::Uuid::new_v4();
    let mut expected = Vec::new();
    for seq in 0..5 {
        let id: uuid::Uuid = outbox
            .client
            .query_one(
                &format!("SELECT {s}.outbox_emit('Order', $1, 'Emitted', $2)"),
                &[&agg, &serde_json::json!({ "seq": seq })],
            )
            .await
            .unwrap()
            .get(0);
        expected.push(id);
    }
    let big = "x".repeat(5000);
    outbox
        .client
        .execute(
            &format!(
                "SELECT {s}.outbox_publish('Order', gen_random_uuid(), 'TooBig', jsonb_build_object('seq', 0, 'pad', $1::text))"
            ),
            &[&big],
        )
        .await
        .unwrap();
    let written = publish(&outbox, 10).await;
    expected.extend(written.committed.iter().map(|w| w.tracking_id));
    // Killed as soon as read_committed readers see the commit, before a
    // status update is likely to have confirmed it: the next run replays.
    committed_records(&outbox, expected.len()).await;
    relay.kill();
    let relay = outbox.start_relay();
    wait_for("the replay settled", DEADLINE, || async {
        let st = outbox.statuses().await;
        (!st.contains_key("PENDING") && st.get("DEAD_LETTER") == Some(&1)).then_some(())
    })
    .await;
    let topics = vec![outbox.topic("Order")];
    let want = expected.len();
    let records = tokio::task::spawn_blocking(move || {
        read_topics_as(&topics, DEADLINE, Some(Isolation::ReadCommitted), |r| {
            r.len() >= want
        })
    })
    .await
    .unwrap();
    let mut seen: Vec<String> = records
        .iter()
        .map(|r| r.header("tracking_id").to_owned())
        .collect();
    seen.sort();
    let mut want: Vec<String> = expected.iter().map(uuid::Uuid::to_string).collect();
    want.sort();
    assert_eq!(
        seen, want,
        "every message and row once, the oversized one never"
    );
    let error: String = outbox
        .client
        .query_one(
            &format!("SELECT last_error FROM {s}.outbox WHERE status = 'DEAD_LETTER'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        error.contains("large") || error.contains("bytes"),
        "{error}"
    );
    relay.terminate();
}

/// Rows of the outbox and billing_outbox tables not yet COMPLETED.
async fn open_rows(outbox: &TestOutbox) -> i64 {
    let s = &outbox.name;
    let sql = format!(
        "SELECT (SELECT count(*) FROM {s}.outbox WHERE status <> 'COMPLETED') \
              + (SELECT count(*) FROM {s}.billing_outbox WHERE status <> 'COMPLETED')"
    );
    outbox.client.query_one(&sql, &[]).await.unwrap().get(0)
}

/// Publishes `n` transactions of one event in each of the two tables of
/// [`two_outbox_tables_keep_their_rows_apart_across_a_lost_slot`]; returns
/// the tracking ids.
async fn publish_pairs(outbox: &TestOutbox, n: usize, from: usize) -> Vec<uuid::Uuid> {
    let s = &outbox.name;
    let sql = format!(
        "SELECT {s}.outbox_publish('Order', $1, 'Happened', $3), \
                {s}.billing_outbox_publish('Invoice', $2, 'Happened', $3)"
    );
    let (order, invoice) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut ids = Vec::new();
    for seq in from..from + n {
        let payload = serde_json::json!({ "seq": seq });
        let row = outbox
            .client
            .query_one(&sql, &[&order, &invoice, &payload])
            .await
            .unwrap();
        ids.extend([row.get::<_, uuid::Uuid>(0), row.get(1)]);
    }
    ids
}

/// Scenario: two outbox tables on one publication (`kafka.table_topics`),
/// whose ids overlap. Both tables' rows are committed to Kafka and held
/// unmarked, the relay is killed and the slot lost: the new slot's
/// backfill reads both tables and skips exactly the rows the progress
/// record lists for each, then marks them in their own table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_outbox_tables_keep_their_rows_apart_across_a_lost_slot() {
    let _serial = SERIAL.lock().await;
    let mut outbox = outbox("eos_tables").await;
    outbox.migrate_table("billing_outbox");
    let billing_topic = format!("{}.billing", outbox.topic_prefix);
    outbox.extra_config = format!("[kafka.table_topics]\nbilling_outbox = \"{billing_topic}\"\n");
    let topics = vec![outbox.topic("Order"), billing_topic.clone()];
    let relay = outbox.start_relay();
    let mut ids = publish_pairs(&outbox, 10, 0).await;
    wait_for("both tables' rows COMPLETED", DEADLINE, || async {
        (open_rows(&outbox).await == 0).then_some(())
    })
    .await;
    // Hold the marks of both tables.
    let holder = outbox.hold_marks(&["outbox", "billing_outbox"]).await;
    ids.extend(publish_pairs(&outbox, 30, 10).await);
    let visible = {
        let topics = topics.clone();
        tokio::task::spawn_blocking(move || {
            read_topics_as(&topics, DEADLINE, Some(Isolation::ReadCommitted), |r| {
                r.len() >= 22
            })
            .len()
        })
        .await
        .unwrap()
    };
    assert_eq!(open_rows(&outbox).await, 60, "none of the 60 marked");
    relay.kill();
    eprintln!(
        "killed with {} of the 60 held rows committed in Kafka",
        visible - 20
    );
    drop(holder);
    outbox.drop_slot().await;
    let relay = Relay::spawn(
        outbox.command_with_args(&["run", "--recreate-slot"]),
        &outbox.name,
    );
    wait_for("both tables' rows COMPLETED", DEADLINE, || async {
        (open_rows(&outbox).await == 0).then_some(())
    })
    .await;
    ids.extend(publish_pairs(&outbox, 5, 40).await);
    let records = read_until_all_as(
        topics,
        ids.clone(),
        DEADLINE,
        Some(Isolation::ReadCommitted),
    )
    .await;
    let mut counts: std::collections::HashMap<&str, usize> = Default::default();
    for r in &records {
        *counts.entry(r.header("tracking_id")).or_default() += 1;
    }
    let twice = counts.values().filter(|&&n| n > 1).count();
    eprintln!(
        "LEDGER eos-two-tables: {} rows in 2 tables, {} records, {} duplicated, {} reordered",
        ids.len(),
        records.len(),
        twice,
        ledger::reorders(&records)
    );
    assert_eq!(twice, 0, "no row of either table twice");
    assert_eq!(records.len(), ids.len(), "every row once, nothing else");
    assert_eq!(ledger::reorders(&records), 0);
    relay.terminate();
}

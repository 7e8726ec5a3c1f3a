//! End-to-end tests of the CDC relay against a real PostgreSQL and a real
//! Kafka broker. Each test owns its schema, slot, publication and topics and
//! ends with a check of what landed in Kafka.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::harness::{read_until_all, wait_for, CommitLog, Record, TestOutbox};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// Per aggregate, the `seq` field of each payload in Kafka order (first
/// occurrence of each tracking id only).
fn sequences(records: &[Record]) -> HashMap<String, Vec<i64>> {
    let mut seen = HashSet::new();
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    for r in sorted {
        if !seen.insert(r.header("tracking_id").to_owned()) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&r.value).expect("payload is JSON");
        out.entry(r.key.clone())
            .or_default()
            .push(v["seq"].as_i64().expect("seq"));
    }
    out
}

fn duplicates(records: &[Record]) -> usize {
    let mut seen = HashSet::new();
    records
        .iter()
        .filter(|r| !seen.insert(r.header("tracking_id")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_concurrent_events_arrive_in_per_aggregate_order_and_complete() {
    let outbox = TestOutbox::new("e2e_order").await;
    let relay = outbox.start_relay();
    const AGGREGATES: usize = 100;
    const PER_AGGREGATE: usize = 100;
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::new_v4()).collect();
    // 4 writers, each owning 25 aggregates, committing transactions of 1..=7
    // events that interleave aggregates; per aggregate, commit order is the
    // order of `seq`.
    let mut writers = Vec::new();
    for w in 0..4 {
        let mine: Vec<Uuid> = aggregates.iter().skip(w).step_by(4).copied().collect();
        let schema = outbox.name.clone();
        writers.push(tokio::spawn(async move {
            let mut client = common::harness::connect().await;
            let mut ids = Vec::new();
            let mut next = vec![0i64; mine.len()];
            let mut remaining: usize = mine.len() * PER_AGGREGATE;
            let mut k = w;
            while remaining > 0 {
                let tx = client.transaction().await.unwrap();
                let n = 1 + (k % 7);
                for _ in 0..n.min(remaining) {
                    let a = k % mine.len();
                    k = k.wrapping_mul(31).wrapping_add(17);
                    let a = if next[a] < PER_AGGREGATE as i64 {
                        a
                    } else {
                        (0..mine.len()).find(|&i| next[i] < PER_AGGREGATE as i64).unwrap()
                    };
                    let payload = json!({"seq": next[a], "writer": w});
                    next[a] += 1;
                    let row = tx
                        .query_one(
                            &format!("SELECT {schema}.outbox_publish('Order', $1, 'Updated', $2, $3)"),
                            &[&mine[a], &payload, &json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "k=v"})],
                        )
                        .await
                        .unwrap();
                    ids.push(row.get::<_, Uuid>(0));
                    remaining -= 1;
                }
                tx.commit().await.unwrap();
            }
            ids
        }));
    }
    let mut expected = Vec::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    assert_eq!(expected.len(), AGGREGATES * PER_AGGREGATE);
    let records = read_until_all(vec![outbox.topic("Order")], expected.clone(), DEADLINE).await;

    let ids: HashSet<String> = records
        .iter()
        .map(|r| r.header("tracking_id").to_owned())
        .collect();
    assert!(
        expected.iter().all(|e| ids.contains(&e.to_string())),
        "every tracking_id arrives"
    );
    for (aggregate, seqs) in sequences(&records) {
        let want: Vec<i64> = (0..PER_AGGREGATE as i64).collect();
        if seqs != want {
            for r in records.iter().filter(|r| r.key == aggregate).take(8) {
                eprintln!(
                    "p{} @{} {} {}",
                    r.partition,
                    r.offset,
                    r.value,
                    r.header("created_at")
                );
            }
        }
        assert_eq!(seqs, want, "aggregate {aggregate} out of commit order");
    }
    let partitions: HashMap<&str, HashSet<i32>> =
        records.iter().fold(HashMap::new(), |mut m, r| {
            m.entry(r.key.as_str()).or_default().insert(r.partition);
            m
        });
    assert!(
        partitions.values().all(|p| p.len() == 1),
        "one partition per aggregate"
    );
    let r = &records[0];
    assert_eq!(r.header("aggregate_id"), r.key);
    assert_eq!(r.header("aggregate_type"), "Order");
    assert_eq!(r.header("event_type"), "Updated");
    assert_eq!(
        r.header("traceparent"),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(r.header("tracestate"), "k=v");
    assert!(
        r.header("created_at").starts_with("20"),
        "created_at header: {:?}",
        r.header("created_at")
    );
    assert!(Uuid::parse_str(r.header("tracking_id")).is_ok());
    assert_eq!(duplicates(&records), 0, "no duplicates without failures");
    wait_for("all rows COMPLETED", DEADLINE, || async {
        let s = outbox.statuses().await;
        (s.get("COMPLETED").copied() == Some(expected.len() as i64) && s.len() == 1).then_some(())
    })
    .await;
    assert!(relay.terminate().success(), "SIGTERM exits 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn payload_bytes_and_default_routing_follow_the_record_contract() {
    let mut outbox = TestOutbox::new("e2e_contract").await;
    outbox.env.push((
        "OUTBOX_TOPIC".into(),
        "{aggregate_type}.{event_type}".into(),
    ));
    let relay = outbox.start_relay();
    let agg = Uuid::new_v4();
    let aggregate_type = format!("Contract{}", outbox.topic_prefix.replace('-', ""));
    // jsonb normalises its text: the value must be exactly PostgreSQL's text.
    let payload = json!({"b": [1, 2.5, "x"], "a": {"nested": true}, "unicode": "ação ✓"});
    let id = outbox
        .publish(&aggregate_type, agg, "Placed", &payload)
        .await;
    let expected_text: String = outbox
        .client
        .query_one(
            &format!(
                "SELECT payload::text FROM {}.outbox WHERE tracking_id = $1",
                outbox.name
            ),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let records =
        read_until_all(vec![format!("{aggregate_type}.Placed")], vec![id], DEADLINE).await;
    let r = records
        .iter()
        .find(|r| r.header("tracking_id") == id.to_string())
        .unwrap();
    assert_eq!(r.value, expected_text, "value is the payload byte for byte");
    assert_eq!(r.key, agg.to_string());
    assert!(
        !r.headers.contains_key("traceparent"),
        "no trace headers without trace metadata"
    );
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolled_back_transactions_publish_nothing() {
    let outbox = TestOutbox::new("e2e_rollback").await;
    let relay = outbox.start_relay();
    let mut client = common::harness::connect().await;
    let mut rolled_back = Vec::new();
    for _ in 0..20 {
        let tx = client.transaction().await.unwrap();
        let row = tx
            .query_one(
                &format!(
                    "SELECT {}.outbox_publish('Order', $1, 'Ghost', '{{}}')",
                    outbox.name
                ),
                &[&Uuid::new_v4()],
            )
            .await
            .unwrap();
        rolled_back.push(row.get::<_, Uuid>(0).to_string());
        tx.rollback().await.unwrap();
    }
    let marker = outbox
        .publish("Order", Uuid::new_v4(), "Marker", &json!({}))
        .await;
    let records = read_until_all(vec![outbox.topic("Order")], vec![marker], DEADLINE).await;
    let published: HashSet<&str> = records.iter().map(|r| r.header("tracking_id")).collect();
    assert!(rolled_back
        .iter()
        .all(|id| !published.contains(id.as_str())));
    assert_eq!(records.len(), 1, "only the committed marker");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_inserted_before_the_first_run_are_delivered() {
    let outbox = TestOutbox::new("e2e_backfill").await;
    let mut before = Vec::new();
    for i in 0..500 {
        before.push(
            outbox
                .publish("Order", Uuid::new_v4(), "Early", &json!({"i": i}))
                .await,
        );
    }
    // Already-delivered rows must not be re-sent by the backfill.
    outbox
        .client
        .execute(
            &format!(
                "UPDATE {}.outbox SET status = 'COMPLETED' WHERE tracking_id = $1",
                outbox.name
            ),
            &[&before[0]],
        )
        .await
        .unwrap();
    let relay = outbox.start_relay();
    let after = outbox
        .publish("Order", Uuid::new_v4(), "Late", &json!({}))
        .await;
    let mut expected = before[1..].to_vec();
    expected.push(after);
    let records = read_until_all(vec![outbox.topic("Order")], expected.clone(), DEADLINE).await;
    let ids: HashSet<&str> = records.iter().map(|r| r.header("tracking_id")).collect();
    assert!(
        !ids.contains(before[0].to_string().as_str()),
        "a COMPLETED row is not backfilled"
    );
    assert_eq!(records.len(), expected.len(), "each row once");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_unroutable_rows_are_dead_lettered_and_the_stream_moves_on() {
    let mut outbox = TestOutbox::new("e2e_dead_letter").await;
    outbox.extra_config = "[kafka]\nmessage_max_bytes = 100000\n".into();
    let prefix = outbox.topic_prefix.clone();
    outbox
        .env
        .push(("OUTBOX_TOPIC".into(), format!("{prefix}.{{event_type}}")));
    let relay = outbox.start_relay();
    let big = "x".repeat(200_000);
    let huge = outbox
        .publish("Order", Uuid::new_v4(), "Big", &json!({ "blob": big }))
        .await;
    let bad_topic = outbox
        .publish("Order", Uuid::new_v4(), "has space!", &json!({}))
        .await;
    let after = outbox
        .publish("Order", Uuid::new_v4(), "Small", &json!({"ok": true}))
        .await;
    read_until_all(vec![format!("{prefix}.Small")], vec![after], DEADLINE).await;
    for (id, needle) in [
        (huge, "message_max_bytes"),
        (bad_topic, "invalid topic name"),
    ] {
        let (status, err): (String, Option<String>) = wait_for("dead letter", DEADLINE, || async {
            let row = outbox
                .client
                .query_one(
                    &format!(
                        "SELECT status, last_error FROM {}.outbox WHERE tracking_id = $1",
                        outbox.name
                    ),
                    &[&id],
                )
                .await
                .unwrap();
            let s: String = row.get(0);
            (s == "DEAD_LETTER").then(|| (s, row.get(1)))
        })
        .await;
        assert_eq!(status, "DEAD_LETTER");
        assert!(
            err.unwrap_or_default().contains(needle),
            "last_error mentions {needle}"
        );
    }
    // The flush position passes the dead-lettered rows.
    let confirmed_before = outbox.confirmed_flush().await;
    let last = outbox
        .publish("Order", Uuid::new_v4(), "Small", &json!({"ok": 2}))
        .await;
    read_until_all(vec![format!("{prefix}.Small")], vec![last], DEADLINE).await;
    wait_for("flush LSN advances past dead letters", DEADLINE, || async {
        (outbox.confirmed_flush().await > confirmed_before).then_some(())
    })
    .await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unrelated_table_writes_do_not_hold_back_the_slot() {
    let outbox = TestOutbox::new("e2e_idle_wal").await;
    let relay = outbox.start_relay();
    let first = outbox
        .publish("Order", Uuid::new_v4(), "First", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![first], DEADLINE).await;
    let noise = format!("{}.noise", outbox.name);
    // Read before the noise: the relay may confirm past it within moments.
    let start = outbox.confirmed_flush().await;
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {noise} (id bigserial primary key, filler text);
             INSERT INTO {noise} (filler) SELECT repeat('n', 1000) FROM generate_series(1, 30000);"
        ))
        .await
        .unwrap();
    let target: i64 = outbox
        .client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        (target as u64) > start + 20_000_000,
        "the noise wrote tens of MB of WAL"
    );
    wait_for(
        "confirmed_flush_lsn passes the unrelated WAL",
        DEADLINE,
        || async { (outbox.confirmed_flush().await >= target as u64).then_some(()) },
    )
    .await;
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_stream_loses_nothing_and_resends_only_unconfirmed_events() {
    let mut outbox = TestOutbox::new("e2e_sigkill").await;
    outbox
        .env
        .push(("OUTBOX_MARK_COMPLETED".into(), "false".into()));
    let probe = CommitLog::start(&outbox).await;
    let relay = outbox.start_relay();
    // Streaming before the writer starts: rows written while the relay
    // still made its slot would be backfilled, and a relay killed during
    // its first backfill redoes it (not what this test is about).
    let warm = outbox
        .publish("Warm", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Warm")], vec![warm], DEADLINE).await;
    let schema = outbox.name.clone();
    // Writer: transactions of 10 events, recording each transaction's xid.
    let writer = tokio::spawn(async move {
        let mut client = common::harness::connect().await;
        let mut by_xid: Vec<(u32, Vec<Uuid>)> = Vec::new();
        for t in 0..300 {
            let tx = client.transaction().await.unwrap();
            let xid: i64 = tx
                .query_one("SELECT txid_current()", &[])
                .await
                .unwrap()
                .get(0);
            let mut ids = Vec::new();
            for i in 0..10 {
                let row = tx
                    .query_one(
                        &format!("SELECT {schema}.outbox_publish('Order', $1, 'Tick', $2)"),
                        &[&Uuid::new_v4(), &json!({"t": t, "i": i})],
                    )
                    .await
                    .unwrap();
                ids.push(row.get::<_, Uuid>(0));
            }
            tx.commit().await.unwrap();
            by_xid.push((xid as u32, ids));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        by_xid
    });
    // Kill once some events have been confirmed, while the writer still runs.
    wait_for("some confirmed progress", DEADLINE, || async {
        let s = outbox.confirmed_flush().await;
        let base: i64 = outbox
            .client
            .query_one(&format!("SELECT count(*) FROM {}.outbox", outbox.name), &[])
            .await
            .unwrap()
            .get(0);
        (s > 0 && base > 500).then_some(())
    })
    .await;
    relay.kill();
    let confirmed_at_kill = outbox.confirmed_flush().await;
    let relay = outbox.start_relay();
    let by_xid = writer.await.unwrap();
    let expected: Vec<Uuid> = by_xid.iter().flat_map(|(_, ids)| ids.clone()).collect();
    let records = read_until_all(vec![outbox.topic("Order")], expected.clone(), DEADLINE).await;
    let commit_ends = probe.commit_ends(&outbox.client).await;
    probe.stop(&outbox.client).await;

    let counts = common::harness::delivery_counts(&records);
    let missing = common::harness::missing(&expected, &counts);
    assert_eq!(missing, 0, "no event is missing");
    let mut dup_events = 0;
    for (xid, ids) in &by_xid {
        let end = commit_ends[xid];
        for id in ids {
            let n = counts[id.to_string().as_str()];
            if n > 1 {
                dup_events += 1;
                assert!(
                    end > confirmed_at_kill,
                    "event of a transaction confirmed before the kill (end {end} <= {confirmed_at_kill}) was re-sent"
                );
            }
        }
    }
    eprintln!(
        "sigkill: {} events, {} duplicated (all unconfirmed at the kill)",
        expected.len(),
        dup_events
    );
    drop(relay);
}

/// Three marks given to a mark writer in `mark_with` mode on a fresh
/// table: ticket 1 for a row already `COMPLETED` (in 2000), 2 for a row
/// not inserted yet (its id reserved), 3 for a pending row. Returns the
/// outbox, the writer, its durable tickets and (done, later, pending) ids
/// with the created_at the later row must be inserted with.
async fn three_marks(
    name: &str,
    mark_with: pgoutbox::config::MarkWith,
    stream: Option<pgoutbox::outbox::StreamProgress>,
) -> (
    TestOutbox,
    pgoutbox::outbox::MarkWriter,
    tokio::sync::mpsc::UnboundedReceiver<Result<u64, String>>,
    (i64, i64, i64),
    String,
) {
    use pgoutbox::outbox::{Batching, Mark, MarkKind, MarkWriter, RowKey};

    let outbox = TestOutbox::new(name).await;
    let schema = outbox.name.clone();
    let key = |id: i64, at: &str| RowKey {
        table: None,
        id: id.to_string().into(),
        created_at: at.to_owned().into(),
    };
    // Two rows now (one already COMPLETED), the id of a third to come.
    let rows = outbox
        .client
        .query(
            &format!(
                "INSERT INTO {schema}.outbox (aggregate_id, aggregate_type, event_type, payload, status, processed_at) \
                 VALUES (gen_random_uuid(), 'acct', 'done', '{{}}', 'COMPLETED', '2000-01-01'), \
                        (gen_random_uuid(), 'acct', 'pending', '{{}}', 'PENDING', NULL) \
                 RETURNING id, created_at::text, nextval(pg_get_serial_sequence('{schema}.outbox', 'id'))"
            ),
            &[],
        )
        .await
        .expect("insert rows");
    let (done_id, done_at): (i64, String) = (rows[0].get(0), rows[0].get(1));
    let (pending_id, pending_at): (i64, String) = (rows[1].get(0), rows[1].get(1));
    let later_id: i64 = rows[1].get(2);

    let settings =
        common::harness::database_settings(&common::services().database_url).expect("settings");
    let (writer, done_rx) = MarkWriter::spawn(
        settings,
        &schema,
        "outbox",
        Batching {
            size: 100,
            linger: Duration::from_millis(20),
        },
        mark_with,
        stream,
    );
    for (ticket, k) in [
        (1, key(done_id, &done_at)),
        (2, key(later_id, &pending_at)),
        (3, key(pending_id, &pending_at)),
    ] {
        assert!(writer.mark(Mark {
            ticket,
            kind: MarkKind::Completed(k),
        }));
    }
    (
        outbox,
        writer,
        done_rx,
        (done_id, later_id, pending_id),
        pending_at,
    )
}

/// The next `n` tickets a mark writer reports durable, sorted.
async fn durable_tickets(
    done: &mut tokio::sync::mpsc::UnboundedReceiver<Result<u64, String>>,
    n: usize,
) -> Vec<u64> {
    let mut durable = Vec::new();
    while durable.len() < n {
        let t = tokio::time::timeout(DEADLINE, done.recv())
            .await
            .expect("tickets reported in time")
            .expect("writer running");
        durable.push(t.expect("database reachable"));
    }
    durable.sort();
    durable
}

/// Inserts the row whose id [`three_marks`] reserved.
async fn insert_late_row(outbox: &TestOutbox, id: i64, created_at: &str) {
    outbox
        .client
        .execute(
            &format!(
                "INSERT INTO {}.outbox (id, aggregate_id, aggregate_type, event_type, payload, created_at) \
                 VALUES ($1, gen_random_uuid(), 'acct', 'later', '{{}}', $2::text::timestamptz)",
                outbox.name
            ),
            &[&id, &created_at],
        )
        .await
        .expect("insert the late row");
}

/// A relay that resumes at the WAL end of an idle database receives
/// nothing from its walsender, not even a keepalive; it still counts as
/// caught up (it has decoded everything before its start) and folds what
/// an earlier relay journaled (ARCHITECTURE.md, invariant 14).
#[tokio::test]
async fn a_relay_resuming_at_the_wal_end_folds_what_an_earlier_one_journaled() {
    let outbox = TestOutbox::new("fold_resume").await;
    // The slot, made by a first run on an empty table.
    let first = outbox.start_relay();
    wait_for("the first relay's slot", DEADLINE, || async {
        (outbox.confirmed_flush().await > 0).then_some(())
    })
    .await;
    assert!(first.terminate().success());
    // Rows an earlier relay delivered and journaled but did not fold, and a
    // slot confirmed past all of it, as that relay would have left them.
    // The slot is advanced in a transaction of its own: past the commit of
    // the rows (in the same one it would stop before that commit, and the
    // resumed relay would send the rows again and fold its own marks).
    let s = &outbox.name;
    outbox
        .client
        .batch_execute(&format!(
            "SELECT {s}.outbox_publish('acct', gen_random_uuid(), 'opened', '{{}}') FROM generate_series(1, 50); \
             INSERT INTO {s}.pgoutbox_delivered (outbox, ids, created_ats) \
               SELECT 'outbox', array_agg(id), array_agg(created_at) FROM {s}.outbox;"
        ))
        .await
        .expect("journal rows");
    outbox
        .client
        .execute(
            "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
            &[&outbox.slot()],
        )
        .await
        .expect("advance the slot past them");
    assert_eq!(outbox.journaled_rows().await, 50);
    let relay = outbox.start_relay();
    wait_for(
        "the journal folded by the resumed relay",
        DEADLINE,
        || async {
            let s = outbox.statuses().await;
            (s.get("COMPLETED") == Some(&50) && s.len() == 1).then_some(())
        },
    )
    .await;
    assert_eq!(outbox.journaled_rows().await, 0);
    assert!(relay.terminate().success());
    outbox.drop_slot().await;
}

/// The mark writer folds the delivery journal only once the relay has
/// decoded its stream to near the server's WAL end (ARCHITECTURE.md,
/// invariant 14): while the relay has read nothing (starting,
/// reconnecting, backfilling) or is far behind (draining a backlog), the
/// entries stay journaled; once it has caught up they are folded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fold_waits_until_the_relay_has_decoded_to_near_the_wal_end() {
    use pgoutbox::outbox::journal::{FOLD_LAG_BYTES, WAL_END_SQL};
    use pgoutbox::outbox::StreamProgress;
    use pgoutbox::Lsn;

    let stream = StreamProgress::default();
    let (outbox, _writer, mut done_rx, (_, _, pending_id), _) = three_marks(
        "fold_gate",
        pgoutbox::config::MarkWith::Journal,
        Some(stream.clone()),
    )
    .await;
    durable_tickets(&mut done_rx, 3).await;
    let wal_end = || async {
        let end: i64 = outbox
            .client
            .query_one(WAL_END_SQL, &[])
            .await
            .expect("WAL end")
            .get(0);
        end as u64
    };
    // A gate can only be shown shut over a while: each state is held for
    // longer than the writer waits before an idle fold (50 ms) plus how
    // often it asks for the WAL end (250 ms), several times over.
    let shut_for = Duration::from_millis(900);
    tokio::time::sleep(shut_for).await;
    assert_eq!(
        outbox.journaled_rows().await,
        3,
        "nothing decoded yet: nothing folded"
    );
    let behind = wal_end()
        .await
        .saturating_sub(FOLD_LAG_BYTES + (1 << 20))
        .max(1);
    stream.set(Lsn(behind));
    tokio::time::sleep(shut_for).await;
    assert_eq!(
        outbox.journaled_rows().await,
        3,
        "more than FOLD_LAG_BYTES behind: nothing folded"
    );
    stream.set(Lsn(wal_end().await));
    wait_for(
        "the journal folded once the relay caught up",
        DEADLINE,
        || async {
            let status: String = outbox
                .client
                .query_one(
                    &format!("SELECT status FROM {}.outbox WHERE id = $1", outbox.name),
                    &[&pending_id],
                )
                .await
                .expect("status")
                .get(0);
            (status == "COMPLETED").then_some(())
        },
    )
    .await;
}

/// Marks that arrive faster than the writer's round trips (an
/// exactly-once commit hands over all its rows at once) are written as
/// several journal entries at once, each of at most `cdc.mark_batch_size`
/// rows, and every one of them is reported durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_marks_go_to_the_journal_in_entries_of_at_most_the_batch_size() {
    use pgoutbox::outbox::{Batching, Mark, MarkKind, MarkWriter, RowKey, StreamProgress};

    let outbox = TestOutbox::new("mark_pipelined").await;
    let s = &outbox.name;
    let rows = outbox
        .client
        .query(
            &format!(
                "INSERT INTO {s}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                 SELECT gen_random_uuid(), 'acct', 'opened', '{{}}' FROM generate_series(1, 1050) \
                 RETURNING id, created_at::text"
            ),
            &[],
        )
        .await
        .expect("insert rows");
    let settings =
        common::harness::database_settings(&common::services().database_url).expect("settings");
    // A relay that has decoded nothing yet: the writer does not fold, so
    // the entries stay to be looked at.
    let (writer, mut done_rx) = MarkWriter::spawn(
        settings,
        s,
        "outbox",
        Batching {
            size: 100,
            linger: Duration::ZERO,
        },
        pgoutbox::config::MarkWith::Journal,
        Some(StreamProgress::default()),
    );
    for (ticket, row) in rows.iter().enumerate() {
        let (id, at): (i64, String) = (row.get(0), row.get(1));
        assert!(writer.mark(Mark {
            ticket: ticket as u64,
            kind: MarkKind::Completed(RowKey::new(None, id.to_string().as_bytes(), at.as_bytes())),
        }));
    }
    let durable = durable_tickets(&mut done_rx, rows.len()).await;
    assert_eq!(durable, (0..rows.len() as u64).collect::<Vec<_>>());
    let entries = outbox
        .client
        .query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE cardinality(ids) > 0), max(cardinality(ids)), \
                        sum(cardinality(ids))::int8, count(DISTINCT u.id)::int8 \
                   FROM {s}.pgoutbox_delivered LEFT JOIN LATERAL unnest(ids) AS u(id) ON true"
            ),
            &[],
        )
        .await
        .expect("journal entries");
    let (count, largest, listed, distinct): (i64, i32, i64, i64) = (
        entries.get(0),
        entries.get(1),
        entries.get(2),
        entries.get(3),
    );
    assert!(
        largest <= 100,
        "an entry of {largest} rows: more than the batch size"
    );
    assert!(count >= 11, "{count} entries for 1,050 rows of at most 100");
    assert_eq!(distinct, 1050, "every row journaled");
    assert!(listed >= 1050, "{listed} rows listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mark_writer_retries_rows_not_yet_visible_and_leaves_completed_rows_alone() {
    let (outbox, _writer, mut done_rx, (done_id, later_id, pending_id), pending_at) =
        three_marks("mark_unseen", pgoutbox::config::MarkWith::Update, None).await;
    let schema = outbox.name.clone();
    let durable = durable_tickets(&mut done_rx, 2).await;
    assert_eq!(durable, vec![1, 3], "the invisible row is not durable yet");
    // The third row becomes visible; its mark is applied and reported.
    insert_late_row(&outbox, later_id, &pending_at).await;
    let t = tokio::time::timeout(DEADLINE, done_rx.recv())
        .await
        .expect("ticket 2 reported once its row is visible")
        .expect("writer running");
    assert_eq!(t, Ok(2));
    let rows = outbox
        .client
        .query(
            &format!(
                "SELECT id, status, processed_at < '2001-01-01' FROM {schema}.outbox ORDER BY id"
            ),
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(i64, String, Option<bool>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        seen,
        vec![
            (done_id, "COMPLETED".to_owned(), Some(true)),
            (pending_id, "COMPLETED".to_owned(), Some(false)),
            (later_id, "COMPLETED".to_owned(), Some(false)),
        ],
        "the COMPLETED row kept its processed_at; the others were marked"
    );
}

/// The mark writer with the delivery journal (the default): every mark is
/// durable once its journal entry commits, even for a row not visible yet;
/// the rows stay as they are until the writer, idle, folds the journal into
/// them: a pending row becomes `COMPLETED` with the entry's time, a row
/// already `COMPLETED` keeps its `processed_at`, a row the fold cannot see
/// yet is kept in the journal and folded once it is visible. Nothing is left
/// in the journal at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mark_writer_journals_deliveries_and_folds_them_into_the_rows_when_idle() {
    let (outbox, writer, mut done_rx, (done_id, later_id, pending_id), pending_at) =
        three_marks("mark_journal", pgoutbox::config::MarkWith::Journal, None).await;
    let schema = outbox.name.clone();
    let durable = durable_tickets(&mut done_rx, 3).await;
    assert_eq!(
        durable,
        vec![1, 2, 3],
        "journaled marks are durable at once"
    );
    let status_of = |id: i64| {
        let client = &outbox.client;
        let schema = schema.clone();
        async move {
            client
                .query_opt(
                    &format!("SELECT status, processed_at < '2001-01-01' FROM {schema}.outbox WHERE id = $1"),
                    &[&id],
                )
                .await
                .unwrap()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Option<bool>>(1)))
        }
    };
    // Idle, the writer folds: the pending row becomes COMPLETED.
    wait_for("the pending row folded to COMPLETED", DEADLINE, || async {
        (status_of(pending_id).await == Some(("COMPLETED".to_owned(), Some(false)))).then_some(())
    })
    .await;
    assert_eq!(
        status_of(done_id).await,
        Some(("COMPLETED".to_owned(), Some(true))),
        "a COMPLETED row keeps its processed_at"
    );
    let left = outbox.journaled_rows().await;
    assert_eq!(left, 1, "the row not visible yet stays journaled");
    insert_late_row(&outbox, later_id, &pending_at).await;
    wait_for("the late row folded once visible", DEADLINE, || async {
        (status_of(later_id).await == Some(("COMPLETED".to_owned(), Some(false)))).then_some(())
    })
    .await;
    let left = outbox.journaled_rows().await;
    assert_eq!(left, 0, "the journal is empty once folded");
    drop(writer);
}

/// Several hosts in DATABASE_URL, as libpq takes them: the first one is
/// down, so the replication connection and the ordinary ones alike go on
/// to the next, the writable primary (`target_session_attrs=read-write`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_list_skips_the_hosts_that_are_down() {
    let mut outbox = TestOutbox::new("relay_hosts").await;
    let url = common::services().database_url.clone();
    let dead = common::harness::free_port();
    let (head, tail) = url.split_once('@').expect("user@host in DATABASE_URL");
    let (hostport, path) = tail.split_once('/').expect("host/db in DATABASE_URL");
    let listed = format!(
        "{head}@127.0.0.1:{dead},{hostport}/{path}?target_session_attrs=read-write&connect_timeout=5"
    );
    outbox.env.push(("DATABASE_URL".into(), listed));
    let relay = outbox.start_relay();
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Listed", &json!({"n": 1}))
        .await;
    read_until_all(
        vec![outbox.topic("Order")],
        vec![id],
        Duration::from_secs(120),
    )
    .await;
    wait_for(
        "the row marked COMPLETED",
        Duration::from_secs(60),
        || async { (outbox.statuses().await.get("COMPLETED") == Some(&1)).then_some(()) },
    )
    .await;
    assert!(relay.terminate().success());
}

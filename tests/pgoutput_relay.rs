//! The relay over the whole pgoutput protocol on a real server: the
//! table-less outbox (logical messages), several outbox tables, streamed
//! in-progress transactions, new partitions, and a huge transaction in
//! bounded memory.

mod common;

use std::time::Duration;

use common::harness::{read_until_all, topic_record_count, wait_for, TestOutbox};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logical_messages_flow_like_rows_and_malformed_ones_are_dead_lettered() {
    let outbox = TestOutbox::new("msg_outbox").await;
    let relay = outbox.start_relay();
    // Messages have no row to backfill: only those written after the slot
    // exists are in its stream, so wait until the relay streams.
    // (An active slot is not enough: its walsender is active while it still
    // builds the initial snapshot, waiting for running transactions.)
    wait_for("the relay streams", DEADLINE, || async {
        outbox
            .client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
                  WHERE s.slot_name = $1 AND r.state = 'streaming'",
                &[&outbox.slot()],
            )
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    let prefix = outbox.name.clone();
    let agg = Uuid::new_v4();
    let mut client = common::harness::connect().await;
    // Committed: two events in one transaction, through outbox_emit.
    let tx = client.transaction().await.unwrap();
    let mut emitted = Vec::new();
    for seq in 0..2 {
        let row = tx
            .query_one(
                &format!(
                    "SELECT {}.outbox_emit('Order', $1, 'Emitted', $2, $3)",
                    outbox.name
                ),
                &[
                    &agg,
                    &json!({"seq": seq, "text": "ação"}),
                    &json!({"traceparent": "00-abc-def-01"}),
                ],
            )
            .await
            .unwrap();
        emitted.push(row.get::<_, Uuid>(0));
    }
    tx.commit().await.unwrap();
    // Rolled back: never published.
    let tx = client.transaction().await.unwrap();
    let ghost: Uuid = tx
        .query_one(
            &format!(
                "SELECT {}.outbox_emit('Order', $1, 'Ghost', '{{}}')",
                outbox.name
            ),
            &[&agg],
        )
        .await
        .unwrap()
        .get(0);
    tx.rollback().await.unwrap();
    // Non-transactional: ignored (not enabled). Malformed: dead-lettered.
    let envelope = json!({"tracking_id": Uuid::new_v4(), "aggregate_type": "Order", "aggregate_id": agg,
                          "event_type": "NonTx", "payload": {}});
    outbox
        .client
        .execute(
            "SELECT pg_logical_emit_message(false, $1, $2::text)",
            &[&prefix, &envelope.to_string()],
        )
        .await
        .unwrap();
    let bad_lsn: String = outbox
        .client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, 'not an envelope')::text",
            &[&prefix],
        )
        .await
        .unwrap()
        .get(0);
    // Another prefix is none of our business.
    outbox
        .client
        .execute(
            "SELECT pg_logical_emit_message(true, 'someone_else', 'x')",
            &[],
        )
        .await
        .unwrap();
    let marker: Uuid = outbox
        .client
        .query_one(
            &format!(
                "SELECT {}.outbox_emit('Order', $1, 'Marker', '{{}}')",
                outbox.name
            ),
            &[&agg],
        )
        .await
        .unwrap()
        .get(0);
    let mut expected = emitted.clone();
    expected.push(marker);
    let records = read_until_all(vec![outbox.topic("Order")], expected.clone(), DEADLINE).await;
    let ids: Vec<&str> = records.iter().map(|r| r.header("tracking_id")).collect();
    assert_eq!(
        ids,
        expected
            .iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    assert!(!ids.contains(&ghost.to_string().as_str()));
    let first = &records[0];
    assert_eq!(first.key, agg.to_string());
    assert_eq!(first.header("event_type"), "Emitted");
    assert_eq!(first.header("traceparent"), "00-abc-def-01");
    assert!(first.header("created_at").starts_with("20"));
    let expected_payload: String = outbox
        .client
        .query_one(
            "SELECT jsonb_build_object('seq', 0, 'text', 'ação')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        first.value, expected_payload,
        "payload byte for byte as PostgreSQL wrote it"
    );
    let (lsn, err): (String, String) = wait_for("dead-lettered message", DEADLINE, || async {
        outbox
            .client
            .query_opt(
                &format!(
                    "SELECT lsn::text, error FROM {}.pgoutbox_dead_letters WHERE prefix = $1",
                    outbox.name
                ),
                &[&prefix],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1)))
    })
    .await;
    assert_eq!(lsn, bad_lsn, "recorded with its LSN");
    assert!(err.contains("malformed outbox envelope"), "{err}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_outbox_tables_in_one_publication_route_by_their_own_templates() {
    let mut outbox = TestOutbox::new("multi_table").await;
    outbox.migrate_table("billing_outbox");
    let billing_topic = format!("{}.billing.{{event_type}}", outbox.topic_prefix);
    outbox.extra_config = format!("[kafka.table_topics]\nbilling_outbox = \"{billing_topic}\"\n");
    // A row already pending in the second table is backfilled too.
    let early: Uuid = outbox
        .client
        .query_one(
            &format!(
                "SELECT {}.billing_outbox_publish('Invoice', $1, 'Early', '{{}}')",
                outbox.name
            ),
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap()
        .get(0);
    let relay = outbox.start_relay();
    let order = outbox
        .publish("Order", Uuid::new_v4(), "Placed", &json!({}))
        .await;
    let invoice: Uuid = outbox
        .client
        .query_one(
            &format!(
                "SELECT {}.billing_outbox_publish('Invoice', $1, 'Issued', '{{}}')",
                outbox.name
            ),
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap()
        .get(0);
    read_until_all(vec![outbox.topic("Order")], vec![order], DEADLINE).await;
    let billing = format!("{}.billing.Issued", outbox.topic_prefix);
    let recs = read_until_all(vec![billing], vec![invoice], DEADLINE).await;
    assert_eq!(recs.len(), 1);
    let early_topic = format!("{}.billing.Early", outbox.topic_prefix);
    read_until_all(vec![early_topic], vec![early], DEADLINE).await;
    // One transaction writes a row to each table with the same id and the
    // same created_at: each mark must land in its own table.
    let s = &outbox.name;
    let mut writer = common::harness::connect().await;
    let tx = writer.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT setval(pg_get_serial_sequence('{s}.billing_outbox', 'id'), nextval(pg_get_serial_sequence('{s}.outbox', 'id')))"),
        &[],
    )
    .await
    .unwrap();
    let mut paired = Vec::new();
    for (function, kind) in [
        ("outbox_publish", "Order"),
        ("billing_outbox_publish", "Invoice"),
    ] {
        let id: Uuid = tx
            .query_one(
                &format!("SELECT {s}.{function}($1, $2, 'Paired', '{{}}')"),
                &[&kind, &Uuid::new_v4()],
            )
            .await
            .unwrap()
            .get(0);
        paired.push(id);
    }
    tx.commit().await.unwrap();
    let same: i64 = outbox
        .client
        .query_one(
            &format!(
                "SELECT count(*) FROM {s}.outbox o JOIN {s}.billing_outbox b USING (id, created_at)"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(same, 1, "the paired rows share id and created_at");
    read_until_all(
        vec![
            outbox.topic("Order"),
            format!("{}.billing.Paired", outbox.topic_prefix),
        ],
        paired,
        DEADLINE,
    )
    .await;
    // Every row of both tables is marked COMPLETED, each in its own table.
    wait_for("every row of both tables COMPLETED", DEADLINE, || async {
        let open: i64 = outbox
            .client
            .query_one(
                &format!(
                    "SELECT (SELECT count(*) FROM {s}.outbox WHERE status <> 'COMPLETED') \
                          + (SELECT count(*) FROM {s}.billing_outbox WHERE status <> 'COMPLETED')"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (open == 0).then_some(())
    })
    .await;
    let billing: i64 = outbox
        .client
        .query_one(&format!("SELECT count(*) FROM {s}.billing_outbox"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(billing, 3);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_transactions_publish_only_what_commits() {
    let mut outbox = TestOutbox::new("streamed_tx").await;
    let url = common::services().database_url.clone();
    let sep = if url.contains('?') { '&' } else { '?' };
    // A tiny decoding memory makes the server stream in-progress transactions.
    outbox.env.push((
        "DATABASE_URL".into(),
        format!("{url}{sep}options=-c%20logical_decoding_work_mem%3D64kB"),
    ));
    outbox.extra_config = "[cdc]\nstreaming = true\n".into();
    let relay = outbox.start_relay();
    let warm = outbox
        .publish("Order", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![warm], DEADLINE).await;
    let schema = outbox.name.clone();
    let insert = |n: i32, event: &'static str| {
        format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'Order', gen_random_uuid(), '{event}', jsonb_build_object('i', i, 'pad', repeat('x', 200)) \
               FROM generate_series(1, {n}) AS i"
        )
    };
    // Aborted whole: nothing is published.
    outbox
        .client
        .batch_execute(&format!("BEGIN; {}; ROLLBACK;", insert(3000, "Aborted")))
        .await
        .unwrap();
    // Committed with one subtransaction rolled back: only the rest arrives,
    // and nothing before the commit even though the server streamed it.
    let mut writer = common::harness::connect().await;
    let tx = writer.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "{}; SAVEPOINT s; {}; ROLLBACK TO SAVEPOINT s; {};",
        insert(2000, "Kept"),
        insert(1500, "Dropped"),
        insert(1000, "KeptToo")
    ))
    .await
    .unwrap();
    let written: i64 = outbox
        .client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The relay reports as `write` what it has received: once that passes the
    // open transaction's changes, it holds them.
    wait_for(
        "the relay received the streamed changes",
        DEADLINE,
        || async {
            let row = outbox
                .client
                .query_opt(
                    "SELECT (r.write_lsn - '0/0'::pg_lsn)::bigint FROM pg_stat_replication r \
                   JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
                    &[&outbox.slot()],
                )
                .await
                .unwrap();
            row.and_then(|r| r.get::<_, Option<i64>>(0))
                .filter(|w| *w >= written)
                .map(|_| ())
        },
    )
    .await;
    let topic = outbox.topic("Order");
    let before_commit = {
        let t = topic.clone();
        tokio::task::spawn_blocking(move || topic_record_count(&t))
            .await
            .unwrap()
    };
    assert_eq!(
        before_commit, 1,
        "nothing of the open transaction was published early"
    );
    tx.commit().await.unwrap();
    let streamed: i64 = outbox
        .client
        .query_one(
            "SELECT coalesce(sum(stream_txns), 0)::bigint FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&outbox.slot()],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let marker = outbox
        .publish("Order", Uuid::new_v4(), "Marker", &json!({}))
        .await;
    let records = read_until_all(vec![topic], vec![marker], DEADLINE).await;
    let count = |e: &str| {
        records
            .iter()
            .filter(|r| r.header("event_type") == e)
            .count()
    };
    assert_eq!(
        count("Aborted"),
        0,
        "an aborted streamed transaction publishes nothing"
    );
    assert_eq!(
        count("Dropped"),
        0,
        "a rolled-back subtransaction publishes nothing"
    );
    assert_eq!(count("Kept"), 2000);
    assert_eq!(count("KeptToo"), 1000);
    eprintln!("server streamed {streamed} transaction(s)");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_in_a_newly_attached_partition_arrive_under_the_root_routing() {
    let outbox = TestOutbox::new("new_partition").await;
    let relay = outbox.start_relay();
    let warm = outbox
        .publish("Order", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![warm], DEADLINE).await;
    let s = &outbox.name;
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {s}.outbox_2031_01 (LIKE {s}.outbox INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
             ALTER TABLE {s}.outbox ATTACH PARTITION {s}.outbox_2031_01
               FOR VALUES FROM ('2031-01-01 00:00:00+00') TO ('2031-02-01 00:00:00+00');"
        ))
        .await
        .unwrap();
    let id: Uuid = outbox
        .client
        .query_one(
            &format!(
                "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
                 VALUES ('Order', gen_random_uuid(), 'Future', '{{}}', '2031-01-15 12:00:00+00') RETURNING tracking_id"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let records = read_until_all(vec![outbox.topic("Order")], vec![id], DEADLINE).await;
    let r = records
        .iter()
        .find(|r| r.header("tracking_id") == id.to_string())
        .unwrap();
    assert_eq!(r.header("created_at"), "2031-01-15 12:00:00+00");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_row_transaction_arrives_whole_in_bounded_memory() {
    let rows: i64 = std::env::var("PGOUTBOX_HUGE_TX_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut outbox = TestOutbox::new("huge_tx").await;
    outbox
        .env
        .push(("OUTBOX_MARK_COMPLETED".into(), "false".into()));
    let relay = outbox.start_relay();
    let warm = outbox
        .publish("Order", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![warm], DEADLINE).await;
    let s = &outbox.name;
    outbox
        .client
        .batch_execute(&format!(
            "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'Order', md5((i % 1000)::text)::uuid, 'Bulk', jsonb_build_object('i', i, 'pad', repeat('p', 100)) \
               FROM generate_series(1, {rows}) AS i"
        ))
        .await
        .unwrap();
    let end: i64 = outbox
        .client
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .unwrap()
        .get(0);
    let topic = outbox.topic("Order");
    let started = std::time::Instant::now();
    loop {
        let t = topic.clone();
        let n = tokio::task::spawn_blocking(move || topic_record_count(&t))
            .await
            .unwrap();
        if n > rows {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "only {n} of {rows} rows arrived"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    wait_for(
        "the flush passes the transaction",
        Duration::from_secs(300),
        || async { (outbox.confirmed_flush().await >= end as u64).then_some(()) },
    )
    .await;
    let n = {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || topic_record_count(&topic))
            .await
            .unwrap()
    };
    let peak_mib = relay.peak_rss_kib() as f64 / 1024.0;
    eprintln!(
        "huge transaction: {rows} rows in {:.1} s, {n} records in the topic, relay peak RSS {peak_mib:.1} MiB",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        n,
        rows + 1,
        "the whole transaction, once (plus the warm-up event)"
    );
    assert!(
        peak_mib < 256.0,
        "peak RSS {peak_mib:.1} MiB is over 256 MiB"
    );
    assert!(relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prepared_transaction_publishes_only_after_commit_prepared() {
    let outbox = TestOutbox::new("prepared_tx").await;
    let enabled: String = outbox
        .client
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(
        enabled, "0",
        "scripts/services enables prepared transactions"
    );
    let relay = outbox.start_relay();
    let warm = outbox
        .publish("Order", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![warm], DEADLINE).await;
    let gid = format!("{}_{}", outbox.name, Uuid::new_v4().simple());
    let client = common::harness::connect().await;
    client.batch_execute("BEGIN").await.unwrap();
    let prepared: Uuid = client
        .query_one(
            &format!(
                "SELECT {}.outbox_publish('Order', $1, 'Prepared', '{{}}')",
                outbox.name
            ),
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!("PREPARE TRANSACTION '{gid}'"))
        .await
        .unwrap();
    // A later transaction commits and arrives; the prepared one must not.
    let marker = outbox
        .publish("Order", Uuid::new_v4(), "Marker", &json!({}))
        .await;
    let records = read_until_all(vec![outbox.topic("Order")], vec![marker], DEADLINE).await;
    assert!(
        records
            .iter()
            .all(|r| r.header("tracking_id") != prepared.to_string()),
        "published before COMMIT PREPARED"
    );
    client
        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
        .await
        .unwrap();
    read_until_all(vec![outbox.topic("Order")], vec![prepared], DEADLINE).await;
    drop(relay);
}

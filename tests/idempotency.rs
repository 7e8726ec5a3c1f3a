//! The consumer-side idempotency store against a real PostgreSQL, and the
//! example consumer end to end against the relay and Kafka: every event is
//! applied once per consumer group, whatever is redelivered, retried or
//! raced.

mod common;

// The example's consumer loop, compiled into this test so it is exercised as
// written (its `main` is unused here).
#[allow(dead_code)]
#[path = "../examples/consumer.rs"]
mod consumer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::harness::{connect, read_until_all, wait_for, TestOutbox};
use common::services;
use pgoutbox::idempotency::{IdempotencyStore, ProcessError, Processed};
use serde_json::json;
use tokio::sync::oneshot;
use tokio_postgres::Client;
use uuid::Uuid;

/// A table for handlers to write to, deliberately without a unique key so a
/// double application would show as two rows.
async fn create_effects_table(client: &Client, schema: &str) -> String {
    let table = format!("{schema}.effects");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (tracking_id uuid NOT NULL, written_by text NOT NULL)"
        ))
        .await
        .expect("create effects table");
    table
}

async fn effects(client: &Client, table: &str, id: Uuid) -> Vec<String> {
    client
        .query(
            &format!("SELECT written_by FROM {table} WHERE tracking_id = $1"),
            &[&id],
        )
        .await
        .expect("read effects")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn marking_twice_records_once_per_consumer_group() {
    let outbox = TestOutbox::new("idem_mark").await;
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    let client = &outbox.client;
    let id = Uuid::new_v4();

    assert!(!store.is_processed(client, id, "billing").await.unwrap());
    assert!(store.mark_processed(client, id, "billing").await.unwrap());
    assert!(store.is_processed(client, id, "billing").await.unwrap());
    assert!(
        !store.mark_processed(client, id, "billing").await.unwrap(),
        "the second mark must report that it recorded nothing"
    );

    // Another group has its own marker.
    assert!(!store.is_processed(client, id, "shipping").await.unwrap());
    assert!(store.mark_processed(client, id, "shipping").await.unwrap());

    let rows: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.processed_events WHERE tracking_id = $1",
                outbox.name
            ),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
}

#[tokio::test]
async fn processing_the_same_event_twice_runs_the_handler_once() {
    let mut outbox = TestOutbox::new("idem_twice").await;
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    let table = create_effects_table(&outbox.client, &outbox.name).await;
    let id = Uuid::new_v4();
    let calls = AtomicUsize::new(0);

    for attempt in ["first", "second"] {
        let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
        let calls = &calls;
        let outcome = store
            .process_once(&mut outbox.client, id, "billing", |tx| {
                Box::pin(async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tx.execute(&insert, &[&id, &attempt]).await?;
                    Ok::<_, tokio_postgres::Error>(attempt)
                })
            })
            .await
            .unwrap();
        match attempt {
            "first" => assert_eq!(outcome, Processed::Applied("first")),
            _ => assert_eq!(outcome, Processed::AlreadyProcessed),
        }
    }

    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(effects(&outbox.client, &table, id).await, ["first"]);
    assert!(store
        .is_processed(&outbox.client, id, "billing")
        .await
        .unwrap());
}

#[tokio::test]
async fn a_failing_handler_leaves_neither_its_writes_nor_the_marker() {
    let mut outbox = TestOutbox::new("idem_fail").await;
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    let table = create_effects_table(&outbox.client, &outbox.name).await;
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
    let id = Uuid::new_v4();

    let result = store
        .process_once(&mut outbox.client, id, "billing", |tx| {
            Box::pin(async {
                tx.execute(&insert, &[&id, &"failed attempt"])
                    .await
                    .map_err(|e| e.to_string())?;
                Err::<(), _>("payment service said no".to_owned())
            })
        })
        .await;
    match result {
        Err(ProcessError::Handler(e)) => assert_eq!(e, "payment service said no"),
        other => panic!("expected the handler's error, got {other:?}"),
    }
    assert!(effects(&outbox.client, &table, id).await.is_empty());
    assert!(!store
        .is_processed(&outbox.client, id, "billing")
        .await
        .unwrap());

    // The redelivery applies it.
    let outcome = store
        .process_once(&mut outbox.client, id, "billing", |tx| {
            Box::pin(async {
                tx.execute(&insert, &[&id, &"retry"]).await?;
                Ok::<_, tokio_postgres::Error>(())
            })
        })
        .await
        .unwrap();
    assert_eq!(outcome, Processed::Applied(()));
    assert_eq!(effects(&outbox.client, &table, id).await, ["retry"]);
}

#[tokio::test]
async fn a_handler_that_swallows_an_sql_error_is_not_committed() {
    let mut outbox = TestOutbox::new("idem_swallow").await;
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    let table = create_effects_table(&outbox.client, &outbox.name).await;
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
    let id = Uuid::new_v4();

    let result = store
        .process_once(&mut outbox.client, id, "billing", |tx| {
            Box::pin(async {
                tx.execute(&insert, &[&id, &"before the error"]).await?;
                // Ignored, but it aborts the transaction: COMMIT would
                // silently roll back, and the event must not count as done.
                let _ = tx.batch_execute("SELECT 1/0").await;
                Ok::<_, tokio_postgres::Error>(())
            })
        })
        .await;
    match result {
        Err(ProcessError::Database(e)) => assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
        ),
        other => panic!("expected a database error, got {other:?}"),
    }
    assert!(effects(&outbox.client, &table, id).await.is_empty());
    assert!(!store
        .is_processed(&outbox.client, id, "billing")
        .await
        .unwrap());
}

/// Waits until the backend `pid` is blocked on a lock.
async fn wait_until_blocked(observer: &Client, pid: i32) {
    wait_for(
        "the second consumer to block on the marker's row lock",
        Duration::from_secs(20),
        || async {
            let row = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                    &[&pid],
                )
                .await
                .expect("read pg_stat_activity");
            (row.get::<_, i64>(0) == 1).then_some(())
        },
    )
    .await;
}

/// Two consumers race on one event: the first holds its transaction open
/// inside its handler until the second is blocked on the marker, then
/// finishes with `first_succeeds`. Returns both outcomes, how often the
/// second handler ran, and the effects written.
async fn race(
    name: &str,
    first_succeeds: bool,
) -> (
    Result<Processed<&'static str>, ProcessError<tokio_postgres::Error>>,
    Result<Processed<&'static str>, ProcessError<tokio_postgres::Error>>,
    usize,
    Vec<String>,
) {
    let outbox = TestOutbox::new(name).await;
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    let table = create_effects_table(&outbox.client, &outbox.name).await;
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");
    let id = Uuid::new_v4();

    let (inside_tx, inside_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let first = tokio::spawn({
        let (store, insert) = (store.clone(), insert.clone());
        async move {
            let mut client = connect().await;
            store
                .process_once(&mut client, id, "billing", |tx| {
                    Box::pin(async move {
                        tx.execute(&insert, &[&id, &"first"]).await?;
                        inside_tx.send(()).expect("test is waiting");
                        release_rx.await.expect("test releases the first");
                        if first_succeeds {
                            Ok("first")
                        } else {
                            // Any error will do: roll back.
                            Err(tx.batch_execute("SELECT 1/0").await.unwrap_err())
                        }
                    })
                })
                .await
        }
    });
    inside_rx.await.expect("first handler started");

    let second_calls = Arc::new(AtomicUsize::new(0));
    let mut second_client = connect().await;
    let second_pid: i32 = second_client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let second = tokio::spawn({
        let second_calls = second_calls.clone();
        async move {
            store
                .process_once(&mut second_client, id, "billing", |tx| {
                    Box::pin(async move {
                        second_calls.fetch_add(1, Ordering::SeqCst);
                        tx.execute(&insert, &[&id, &"second"]).await?;
                        Ok("second")
                    })
                })
                .await
        }
    });
    wait_until_blocked(&outbox.client, second_pid).await;
    release_tx.send(()).expect("first handler waits");

    let first = first.await.expect("first task");
    let second = second.await.expect("second task");
    let written = effects(&outbox.client, &table, id).await;
    (first, second, second_calls.load(Ordering::SeqCst), written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_consumers_of_one_event_apply_it_exactly_once() {
    let (first, second, second_calls, written) = race("idem_race_commit", true).await;
    assert_eq!(first.unwrap(), Processed::Applied("first"));
    assert_eq!(second.unwrap(), Processed::AlreadyProcessed);
    assert_eq!(second_calls, 0, "the second handler must not run");
    assert_eq!(written, ["first"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_consumer_applies_the_event_when_the_first_rolls_back() {
    let (first, second, second_calls, written) = race("idem_race_rollback", false).await;
    assert!(
        matches!(first, Err(ProcessError::Handler(_))),
        "first: {first:?}"
    );
    assert_eq!(second.unwrap(), Processed::Applied("second"));
    assert_eq!(second_calls, 1);
    assert_eq!(written, ["second"]);
}

/// Columns, defaults and indexes of `schema.processed_events`, with the
/// schema name taken out.
async fn table_shape(client: &Client, schema: &str) -> Vec<String> {
    let mut shape: Vec<String> = client
        .query(
            "SELECT format('%s %s %s %s', column_name, data_type, is_nullable, column_default) \
             FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'processed_events' ORDER BY ordinal_position",
            &[&schema],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    shape.extend(
        client
            .query(
                "SELECT indexdef FROM pg_indexes \
                 WHERE schemaname = $1 AND tablename = 'processed_events' ORDER BY indexname",
                &[&schema],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.get::<_, String>(0).replace(schema, "<schema>")),
    );
    shape
}

#[tokio::test]
async fn create_table_matches_the_migration() {
    let outbox = TestOutbox::new("idem_shape").await;
    let own = "idem_shape_own";
    outbox
        .client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {own} CASCADE; CREATE SCHEMA {own}"
        ))
        .await
        .unwrap();
    let store = IdempotencyStore::new(own).unwrap();
    store.create_table(&outbox.client).await.unwrap();
    store.create_table(&outbox.client).await.unwrap(); // idempotent

    let migrated = table_shape(&outbox.client, &outbox.name).await;
    assert_eq!(
        migrated.len(),
        5,
        "3 columns, primary key, retention index: {migrated:?}"
    );
    assert_eq!(table_shape(&outbox.client, own).await, migrated);
}

/// Moves `group`'s committed offsets on `topic` back to 0, as if the
/// consumer had crashed after its database commits but before its offset
/// commits.
fn rewind(group: &str, topic: &str) {
    use rdkafka::config::ClientConfig;
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
async fn the_example_consumer_applies_each_event_once_even_when_redelivered() {
    let outbox = TestOutbox::new("idem_example").await;
    let relay = outbox.start_relay();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            outbox
                .publish("Order", Uuid::new_v4(), "OrderCreated", &json!({ "n": n }))
                .await,
        );
    }
    let topic = outbox.topic("Order");
    read_until_all(vec![topic.clone()], ids.clone(), Duration::from_secs(60)).await;

    let group = format!("{}-consumer", outbox.topic_prefix);
    let s = services();
    let args = consumer::Args::try_parse_from([
        "consumer",
        &topic,
        "--database-url",
        &s.database_url,
        "--brokers",
        &s.kafka_brokers,
        "--group",
        &group,
        "--schema",
        &outbox.name,
        "--max-events",
        "3",
        "--idle-exit-ms",
        "60000",
    ])
    .expect("parse consumer args");

    let first = consumer::run(&args).await.expect("first consumer run");
    assert_eq!(
        first,
        consumer::Summary {
            applied: 3,
            duplicates: 0
        }
    );

    // Every offset is redelivered; every event is recognised.
    let (g, t) = (group.clone(), topic.clone());
    tokio::task::spawn_blocking(move || rewind(&g, &t))
        .await
        .unwrap();
    let second = consumer::run(&args).await.expect("second consumer run");
    assert_eq!(
        second,
        consumer::Summary {
            applied: 0,
            duplicates: 3
        }
    );

    let mut applied: Vec<Uuid> = outbox
        .client
        .query(
            &format!(
                "SELECT tracking_id FROM {}.consumer_demo_applied",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    applied.sort();
    ids.sort();
    assert_eq!(applied, ids, "each event applied exactly once");
    let store = IdempotencyStore::new(&outbox.name).unwrap();
    for id in &ids {
        assert!(store
            .is_processed(&outbox.client, *id, &group)
            .await
            .unwrap());
    }
    assert!(relay.terminate().success());
}

//! Faults on the shared services: Kafka stopped, PostgreSQL restarted.
//! These stop services other tests use, so they run one at a time (a lock)
//! in their own test binary (cargo runs test binaries one after another).

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::control::{services, walsender as slot_walsender, KafkaBack};
use common::harness::{read_until_all, wait_for, CommitLog, TestOutbox};
use serde_json::json;
use uuid::Uuid;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const DEADLINE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_down_for_30s_backpressure_keeps_feedback_and_never_confirms_unacked_events() {
    let _serial = SERIAL.lock().await;
    let mut outbox = TestOutbox::new("fault_kafka_down").await;
    // A short wal_sender_timeout proves feedback keeps the connection alive
    // through an outage six times longer; a small window forces backpressure.
    let url = common::services().database_url.clone();
    let sep = if url.contains('?') { '&' } else { '?' };
    outbox.env.push((
        "DATABASE_URL".into(),
        format!("{url}{sep}options=-c%20wal_sender_timeout%3D5s"),
    ));
    outbox.extra_config = "[kafka]\nmax_in_flight_events = 100\n".into();
    let probe = CommitLog::start(&outbox).await;
    let relay = outbox.start_relay();
    let warm = outbox
        .publish("Order", Uuid::new_v4(), "Warm", &json!({}))
        .await;
    read_until_all(vec![outbox.topic("Order")], vec![warm], DEADLINE).await;
    let slot = outbox.slot();
    let (pid, _) = wait_for("walsender", DEADLINE, || {
        slot_walsender(&outbox.client, &slot)
    })
    .await;

    services("kafka-stop", None);
    let back = KafkaBack;
    let mut xids = Vec::new();
    let mut during = Vec::new();
    {
        let mut client = common::harness::connect().await;
        for t in 0..20 {
            let tx = client.transaction().await.unwrap();
            let xid: i64 = tx
                .query_one("SELECT txid_current()", &[])
                .await
                .unwrap()
                .get(0);
            for i in 0..50 {
                let row = tx
                    .query_one(
                        &format!(
                            "SELECT {}.outbox_publish('Order', $1, 'During', $2)",
                            outbox.name
                        ),
                        &[&Uuid::new_v4(), &json!({"t": t, "i": i})],
                    )
                    .await
                    .unwrap();
                during.push(row.get::<_, Uuid>(0));
            }
            tx.commit().await.unwrap();
            xids.push(xid as u32);
        }
    }
    let commit_ends = probe.commit_ends(&outbox.client).await;
    let first_unacked_end = xids.iter().map(|x| commit_ends[x]).min().unwrap();
    // 30 s outage: the same walsender stays connected (feedback flows),
    // reply_time keeps moving, and the flush never passes unacked events.
    let started = Instant::now();
    let mut replies = HashSet::new();
    while started.elapsed() < Duration::from_secs(30) {
        let (now_pid, reply) = slot_walsender(&outbox.client, &slot)
            .await
            .expect("walsender still connected");
        assert_eq!(
            now_pid, pid,
            "replication connection was not dropped during the outage"
        );
        replies.insert(reply);
        let confirmed = outbox.confirmed_flush().await;
        assert!(
            confirmed < first_unacked_end,
            "confirmed_flush_lsn {confirmed} passed an unacked commit ending at {first_unacked_end}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        replies.len() >= 5,
        "status updates kept arriving during the outage: {replies:?}"
    );
    drop(back);
    let records = read_until_all(vec![outbox.topic("Order")], during.clone(), DEADLINE).await;
    let got: HashSet<&str> = records.iter().map(|r| r.header("tracking_id")).collect();
    assert!(
        during
            .iter()
            .all(|id| got.contains(id.to_string().as_str())),
        "everything arrives after Kafka returns"
    );
    wait_for("flush passes the outage events", DEADLINE, || async {
        (outbox.confirmed_flush().await >= commit_ends.values().copied().max().unwrap())
            .then_some(())
    })
    .await;
    probe.stop(&outbox.client).await;
    drop(relay);
}

async fn publish_retrying(schema: &str, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    let mut client = None;
    let mut i = 0;
    while i < n {
        if client.is_none() {
            let url = common::services().database_url.clone();
            client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((c, conn)) => {
                    tokio::spawn(conn);
                    Some(c)
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
        }
        let c: &tokio_postgres::Client = client.as_ref().unwrap();
        match c
            .query_one(
                &format!("SELECT {schema}.outbox_publish('Order', $1, 'Tick', $2)"),
                &[&Uuid::new_v4(), &json!({"i": i})],
            )
            .await
        {
            Ok(row) => {
                ids.push(row.get(0));
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            // The insert may or may not have committed: a failed call is
            // not counted (a committed one would only be an extra event).
            Err(_) => client = None,
        }
    }
    ids
}

async fn postgres_restart_mid_stream(mode: &str) {
    let _serial = SERIAL.lock().await;
    let outbox = TestOutbox::new(&format!("fault_pg_{mode}")).await;
    let relay = outbox.start_relay();
    let schema = outbox.name.clone();
    let writer = tokio::spawn(async move { publish_retrying(&schema, 3000).await });
    wait_for("some events relayed", DEADLINE, || async {
        (outbox.confirmed_flush().await > 0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    services("pg-restart", Some(mode));
    let ids = writer.await.unwrap();
    let records = read_until_all(vec![outbox.topic("Order")], ids.clone(), DEADLINE).await;
    let counts = common::harness::delivery_counts(&records);
    let missing = common::harness::missing(&ids, &counts);
    assert_eq!(missing, 0, "no event lost across a {mode} restart");
    let dups = counts.values().filter(|&&n| n > 1).count();
    eprintln!("pg restart {mode}: {} events, {dups} re-sent", ids.len());
    // Every row Kafka has ends delivered in the table's eyes: no mark the
    // relay counted (and confirmed the slot past) was lost in the restart
    // (ARCHITECTURE.md, invariant 15).
    let journal = pgoutbox::outbox::journal::Journal::new(&outbox.name, "outbox");
    let undelivered_sql = format!(
        "SELECT count(*) FROM {}.outbox AS o WHERE o.status <> 'COMPLETED' AND {}",
        outbox.name,
        journal.undelivered("o")
    );
    // (The scenario's own client died with the restart.)
    let client = common::harness::connect().await;
    wait_for(
        "every relayed row delivered in the table",
        DEADLINE,
        || async {
            let n: i64 = client.query_one(&undelivered_sql, &[]).await.ok()?.get(0);
            (n == 0).then_some(())
        },
    )
    .await;
    let mut relay = relay;
    assert!(
        relay.running(),
        "the relay reconnected instead of exiting:\n{}",
        relay.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_fast_restart_mid_stream_loses_nothing() {
    postgres_restart_mid_stream("fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_immediate_restart_mid_stream_loses_nothing() {
    postgres_restart_mid_stream("immediate").await;
}

/// Holds the server's WAL writer off (`wal_writer_delay`) while alive, and
/// resets it when dropped, even if the test panics half-way.
struct WalWriterHeldOff;

/// `ALTER SYSTEM` `change` of `wal_writer_delay` (needs superuser), then a
/// reload.
async fn alter_wal_writer_delay(change: &str) {
    let client = common::harness::connect().await;
    for sql in [
        format!("ALTER SYSTEM {change}"),
        "SELECT pg_reload_conf()".to_owned(),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl WalWriterHeldOff {
    async fn set() -> WalWriterHeldOff {
        alter_wal_writer_delay("SET wal_writer_delay = '10s'").await;
        WalWriterHeldOff
    }
}

impl Drop for WalWriterHeldOff {
    fn drop(&mut self) {
        // A runtime of its own: Drop cannot await the test's.
        let _ = std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(alter_wal_writer_delay("RESET wal_writer_delay"));
        })
        .join();
    }
}

/// A mark reported durable survives a crash of PostgreSQL right after the
/// report (ARCHITECTURE.md, invariant 15). The mark writer commits without
/// waiting for the WAL flush; with the server's WAL writer held off and
/// nothing else committing, nothing but the writer's own wait for the flush
/// (here: the synchronous commit it makes when no one else flushes in time)
/// puts the journal entry on disk before the report. The crash then finds
/// the row delivered; had the writer reported at its commit, the entry would
/// be lost with the row still `PENDING` while the relay had moved on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mark_reported_durable_survives_a_crash_right_after() {
    use pgoutbox::outbox::{Batching, Mark, MarkKind, MarkWriter, RowKey};

    let _serial = SERIAL.lock().await;
    let outbox = TestOutbox::new("fault_mark_flush").await;
    let schema = outbox.name.clone();
    let held_off = WalWriterHeldOff::set().await;
    let row = outbox
        .client
        .query_one(
            &format!(
                "INSERT INTO {schema}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                 VALUES (gen_random_uuid(), 'acct', 'opened', '{{}}') RETURNING id, created_at::text"
            ),
            &[],
        )
        .await
        .expect("insert a row");
    let (id, created_at): (i64, String) = (row.get(0), row.get(1));
    let settings =
        common::harness::database_settings(&common::services().database_url).expect("settings");
    let (writer, mut done) = MarkWriter::spawn(
        settings,
        &schema,
        "outbox",
        Batching {
            size: 100,
            linger: Duration::ZERO,
        },
        pgoutbox::config::MarkWith::Journal,
        None,
    );
    assert!(writer.mark(Mark {
        ticket: 7,
        kind: MarkKind::Completed(RowKey {
            table: None,
            id: id.to_string().into(),
            created_at: created_at.into(),
        }),
    }));
    let reported = tokio::time::timeout(DEADLINE, done.recv())
        .await
        .expect("the mark reported in time")
        .expect("the writer running");
    assert_eq!(reported, Ok(7));
    drop(writer);
    drop(done);
    services("pg-restart", Some("immediate"));
    drop(held_off);

    let client = common::harness::connect().await;
    let journal = pgoutbox::outbox::journal::Journal::new(&schema, "outbox");
    let undelivered: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {schema}.outbox AS o WHERE o.status <> 'COMPLETED' AND {}",
                journal.undelivered("o")
            ),
            &[],
        )
        .await
        .expect("count undelivered rows")
        .get(0);
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.outbox"), &[])
        .await
        .expect("count rows")
        .get(0);
    assert_eq!(rows, 1, "the row itself survived the crash");
    assert_eq!(
        undelivered, 0,
        "the mark reported durable was lost in the crash: the row is neither COMPLETED nor journaled"
    );
}

//! Poll mode against the real PostgreSQL and Kafka of `scripts/services`:
//! leases, the reaper, stale completions, retries and dead letters,
//! per-aggregate ordering, and live switches between poll and CDC. Each test
//! ends with a check of what Kafka holds.

mod common;

use std::time::Duration;

use common::harness::{
    create_topic, delivery_counts, missing, read_until_all, wait_for, Relay, TestOutbox,
};
use common::ledger::reorders;
use uuid::Uuid;

/// Inserts `n` events (one statement) for aggregates chosen round-robin from
/// `aggregates`, each payload carrying its sequence number within its
/// aggregate; returns their tracking ids in insertion order.
async fn insert_events(
    outbox: &TestOutbox,
    aggregate_type: &str,
    aggregates: &[Uuid],
    n: i64,
    first_seq: i64,
) -> Vec<Uuid> {
    let rows = outbox
        .client
        .query(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                 SELECT ($1::uuid[])[1 + (g % array_length($1::uuid[], 1))], $2, 'Happened', \
                        jsonb_build_object('seq', $4::bigint + g / array_length($1::uuid[], 1)) \
                   FROM generate_series(0::bigint, $3::bigint - 1) AS g ORDER BY g RETURNING tracking_id",
                outbox.name
            ),
            &[&aggregates, &aggregate_type, &n, &first_seq],
        )
        .await
        .expect("insert events");
    rows.iter().map(|r| r.get(0)).collect()
}

fn poll_relay(outbox: &TestOutbox, label: &str) -> Relay {
    Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "poll"]),
        &format!("{}-{label}", outbox.name),
    )
}

async fn wait_all_completed(outbox: &TestOutbox, n: i64, timeout: Duration) {
    wait_for("every row COMPLETED", timeout, || async {
        let s = outbox.statuses().await;
        (s.get("COMPLETED").copied().unwrap_or(0) == n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn four_workers_deliver_everything_after_one_relay_is_killed_mid_batch() {
    let mut outbox = TestOutbox::new("poll_kill").await;
    outbox.extra_config =
        "[outbox]\nlease_seconds = 3\nbatch_size = 200\n\n[poll]\nconcurrency = 2\n".into();
    let aggregates: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let ids = insert_events(&outbox, "Order", &aggregates, 20_000, 0).await;
    // Relay A lingers 500 ms before each send, so it is all but always
    // holding a leased batch when it is killed.
    let mut cmd_a = outbox.command_with_args(&["run", "--mode", "poll"]);
    cmd_a.env("KAFKA_LINGER_MS", "500");
    let a = Relay::spawn(cmd_a, "poll_kill-a");
    let b = poll_relay(&outbox, "b");
    // Kill relay A while both are delivering.
    wait_for("a quarter delivered", Duration::from_secs(120), || async {
        let done = outbox
            .statuses()
            .await
            .get("COMPLETED")
            .copied()
            .unwrap_or(0);
        (done >= 5_000).then_some(())
    })
    .await;
    // Killed only while it provably holds leases: relay B (2 workers of
    // 200) holds at most 400 rows, so more than 400 PROCESSING while A is
    // frozen means some are A's. (Killing A between two batches would leave
    // nothing for the reaper, and the test would prove nothing.)
    let processing = || async {
        outbox
            .statuses()
            .await
            .get("PROCESSING")
            .copied()
            .unwrap_or(0)
    };
    let leased_before_kill = wait_for(
        "relay A holding leased rows",
        Duration::from_secs(120),
        || async {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(a.pid() as i32, libc::SIGSTOP) };
            let leased = processing().await;
            if leased > 400 {
                return Some(leased);
            }
            // SAFETY: as above.
            unsafe { libc::kill(a.pid() as i32, libc::SIGCONT) };
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        },
    )
    .await;
    a.kill();
    wait_all_completed(&outbox, 20_000, Duration::from_secs(120)).await;
    let records = read_until_all(
        vec![outbox.topic("Order")],
        ids.clone(),
        Duration::from_secs(120),
    )
    .await;
    let counts = delivery_counts(&records);
    assert_eq!(missing(&ids, &counts), 0, "events lost");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    // Only rows leased by the killed relay may be sent twice.
    assert!(
        dups <= 2 * 200 + leased_before_kill as usize,
        "{dups} duplicates"
    );
    let log = b.log_text();
    b.terminate();
    let still_leased: i64 = outbox
        .client
        .query_one(&format!("SELECT count(*) FROM {}.outbox WHERE lock_token IS NOT NULL OR locked_until IS NOT NULL", outbox.name), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(still_leased, 0, "completed rows keep no lease");
    // The killed relay's leased rows came back through the reaper and were
    // claimed again (a second attempt).
    let reclaimed: i64 = outbox
        .client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.outbox WHERE retry_count >= 2",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reclaimed > 0, "no row was reaped and claimed again: {log}");
    assert!(log.contains("reaper: leases expired"), "{log}");
}

#[tokio::test]
async fn two_poll_relays_on_one_table_publish_each_row_once() {
    let mut outbox = TestOutbox::new("poll_two").await;
    outbox.extra_config = "[outbox]\nbatch_size = 50\n\n[poll]\nconcurrency = 2\n".into();
    let a = poll_relay(&outbox, "a");
    let b = poll_relay(&outbox, "b");
    let aggregates: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut ids = Vec::new();
    for round in 0..10 {
        ids.extend(insert_events(&outbox, "Order", &aggregates, 500, round * 50).await);
    }
    wait_all_completed(&outbox, 5_000, Duration::from_secs(120)).await;
    let records = read_until_all(
        vec![outbox.topic("Order")],
        ids.clone(),
        Duration::from_secs(60),
    )
    .await;
    let counts = delivery_counts(&records);
    assert_eq!(missing(&ids, &counts), 0);
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        twice.is_empty(),
        "published more than once without an expired lease: {twice:?}"
    );
    assert_eq!(records.len(), 5_000);
    // Both relays did part of the work.
    let (la, lb) = (a.log_text(), b.log_text());
    a.terminate();
    b.terminate();
    for log in [la, lb] {
        assert!(log.contains("serving lock taken"), "{log}");
    }
    // Every row was claimed exactly once.
    let attempts: i64 = outbox
        .client
        .query_one(
            &format!("SELECT max(retry_count)::int8 FROM {}.outbox", outbox.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1);
}

/// The SQL contract of leases, driven directly: a completion with a token
/// whose lease expired and was reaped touches no row; the new holder's does.
#[tokio::test]
async fn stale_completion_after_lease_expiry_touches_no_row() {
    let outbox = TestOutbox::new("poll_stale").await;
    let ids = insert_events(&outbox, "Order", &[Uuid::new_v4()], 3, 0).await;
    let mut config = pgoutbox::config::Config::default();
    config.outbox.schema = outbox.name.clone();
    let s = pgoutbox::poll::Statements::new(&config);
    let c = &outbox.client;
    let claim = |token: i64| {
        let sql = s.claim.clone();
        async move {
            c.query(&sql, &[&10i64, &30.0f64, &token])
                .await
                .expect("claim")
                .iter()
                .map(|r| (r.get::<_, String>("id"), r.get::<_, String>("created_at")))
                .collect::<Vec<_>>()
        }
    };
    let first = claim(1).await;
    assert_eq!(first.len(), 3);
    // Nothing more is due while the lease holds.
    assert!(claim(2).await.is_empty());
    // The lease expires; the reaper returns the rows; a new worker claims.
    c.execute(
        &format!(
            "UPDATE {}.outbox SET locked_until = now() - interval '1 second'",
            outbox.name
        ),
        &[],
    )
    .await
    .unwrap();
    let reaped = c.query_one(&s.reap, &[]).await.unwrap();
    assert_eq!(reaped.get::<_, i64>(0), 3);
    let second = claim(3).await;
    assert_eq!(second.len(), 3);
    let ids_text: Vec<&str> = first.iter().map(|k| k.0.as_str()).collect();
    let created: Vec<&str> = first.iter().map(|k| k.1.as_str()).collect();
    let stale: i64 = c
        .query_one(&s.complete, &[&1i64, &ids_text, &created])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stale, 0, "the stale worker's completion must touch nothing");
    let renewed: i64 = c
        .query_one(&s.renew, &[&1i64, &ids_text, &created, &30.0f64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(renewed, 0, "the stale worker cannot renew either");
    assert_eq!(outbox.statuses().await.get("PROCESSING"), Some(&3));
    let done: i64 = c
        .query_one(&s.complete, &[&3i64, &ids_text, &created])
        .await
        .unwrap()
        .get(0);
    assert_eq!(done, 3);
    let rows = c
        .query(
            &format!(
                "SELECT retry_count, lock_token FROM {}.outbox WHERE status = 'COMPLETED'",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), ids.len());
    for r in rows {
        assert_eq!(r.get::<_, i32>(0), 2, "each claim counts an attempt");
        assert_eq!(r.get::<_, Option<i64>>(1), None);
    }
}

/// Relay settings under which a missing topic is a retriable failure: the
/// relays of the failure tests run with these, so a topic not created yet
/// (`create_topic`) fails every send with a retriable error until it is.
const NO_AUTO_CREATE: &str = "\n[kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n\"allow.auto.create.topics\" = \"false\"\n";

#[tokio::test]
async fn poison_events_are_dead_lettered_while_the_rest_flows_and_redrive_delivers_them() {
    let mut outbox = TestOutbox::new("poll_poison").await;
    outbox.extra_config = "[outbox]\nbatch_size = 20\n\n[poll]\nconcurrency = 2\nbackoff_base_ms = 100\nbackoff_max_ms = 400\n".to_owned() + NO_AUTO_CREATE;
    create_topic(&outbox.topic("Order")).await;
    let good = insert_events(&outbox, "Order", &[Uuid::new_v4(), Uuid::new_v4()], 200, 0).await;
    // Retriable failure every time: dead-lettered after max_retries (3).
    let stuck: Uuid = outbox
        .client
        .query_one(
            &format!("INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, max_retries) \
                      VALUES (gen_random_uuid(), 'Stuck', 'Happened', '{{\"seq\": 0}}', 3) RETURNING tracking_id", outbox.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Permanent failure (no valid topic name): dead-lettered at once.
    let invalid: Uuid = outbox
        .client
        .query_one(
            &format!("INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                      VALUES (gen_random_uuid(), 'bad type!', 'Happened', '{{\"seq\": 0}}') RETURNING tracking_id", outbox.name),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let relay = poll_relay(&outbox, "r");
    let records = read_until_all(
        vec![outbox.topic("Order")],
        good.clone(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(missing(&good, &delivery_counts(&records)), 0);
    let row = |id: Uuid| {
        let c = &outbox.client;
        let sql = format!("SELECT status, retry_count, coalesce(last_error, '') FROM {}.outbox WHERE tracking_id = $1", outbox.name);
        async move {
            let r = c.query_one(&sql, &[&id]).await.unwrap();
            (
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, String>(2),
            )
        }
    };
    let (status, attempts, error) = wait_for(
        "the stuck event dead-lettered",
        Duration::from_secs(60),
        || async {
            let r = row(stuck).await;
            (r.0 == "DEAD_LETTER").then_some(r)
        },
    )
    .await;
    assert_eq!((status.as_str(), attempts), ("DEAD_LETTER", 3), "{error}");
    assert!(error.contains("attempt 3 of 3"), "{error}");
    let (status, attempts, error) = row(invalid).await;
    assert_eq!((status.as_str(), attempts), ("DEAD_LETTER", 1), "{error}");
    assert!(error.contains("topic"), "{error}");
    // The cause is fixed; an operator redrives with a reason.
    create_topic(&outbox.topic("Stuck")).await;
    outbox.run_ok(&[
        "dle",
        "redrive",
        &stuck.to_string(),
        "--reason",
        "topic was missing; created it",
    ]);
    let records = read_until_all(
        vec![outbox.topic("Stuck")],
        vec![stuck],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(delivery_counts(&records).get(&stuck.to_string()), Some(&1));
    wait_for(
        "the redriven event COMPLETED",
        Duration::from_secs(30),
        || async { (row(stuck).await.0 == "COMPLETED").then_some(()) },
    )
    .await;
    let log = relay.log_text();
    relay.terminate();
    assert!(log.contains("dead-lettered"), "{log}");
}

#[tokio::test]
async fn aggregate_ordering_holds_across_workers_relays_and_a_killed_relay() {
    let mut outbox = TestOutbox::new("poll_order").await;
    outbox.extra_config = "[outbox]\nlease_seconds = 3\nbatch_size = 100\nmax_retries = 1000\n\n[poll]\nconcurrency = 2\nordering = \"aggregate\"\nbackoff_base_ms = 100\nbackoff_max_ms = 300\n".to_owned() + NO_AUTO_CREATE;
    // Re-run migrate so the ordering index exists.
    outbox.run_ok(&["migrate"]);
    // One aggregate's topic does not exist at first: its events fail and
    // are retried, and none of its later events may overtake them.
    create_topic(&outbox.topic("Order")).await;
    let aggregates: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    let flaky = vec![Uuid::new_v4()];
    let mut a = Some(poll_relay(&outbox, "a"));
    let b = poll_relay(&outbox, "b");
    let mut ids = Vec::new();
    let mut flaky_ids = Vec::new();
    for round in 0..10 {
        ids.extend(insert_events(&outbox, "Order", &aggregates, 200, round * 5).await);
        flaky_ids.extend(insert_events(&outbox, "Flaky", &flaky, 5, round * 5).await);
        if round == 4 {
            a.take().expect("relay a").kill();
        }
    }
    wait_for("a flaky send retried", Duration::from_secs(60), || async {
        let n: i64 = outbox
            .client
            .query_one(&format!("SELECT count(*) FROM {}.outbox WHERE aggregate_type = 'Flaky' AND retry_count > 1", outbox.name), &[])
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    })
    .await;
    // While the head of the flaky aggregate waits, nothing behind it moved.
    let completed_flaky: i64 = outbox
        .client
        .query_one(&format!("SELECT count(*) FROM {}.outbox WHERE aggregate_type = 'Flaky' AND status = 'COMPLETED'", outbox.name), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(completed_flaky, 0);
    create_topic(&outbox.topic("Flaky")).await;
    wait_all_completed(&outbox, 2_050, Duration::from_secs(180)).await;
    let records = read_until_all(
        vec![outbox.topic("Order")],
        ids.clone(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(missing(&ids, &delivery_counts(&records)), 0);
    assert_eq!(reorders(&records), 0, "per-aggregate order broken");
    let flaky_records = read_until_all(
        vec![outbox.topic("Flaky")],
        flaky_ids.clone(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(missing(&flaky_ids, &delivery_counts(&flaky_records)), 0);
    assert_eq!(
        reorders(&flaky_records),
        0,
        "the flaky aggregate was reordered"
    );
    b.terminate();
}

#[tokio::test]
async fn an_idle_poller_is_woken_by_the_insert_trigger() {
    let mut outbox = TestOutbox::new("poll_notify").await;
    // A poll interval far longer than the deadline below: only the
    // LISTEN/NOTIFY wake-up can deliver in time.
    outbox.extra_config = "[outbox]\npoll_interval_ms = 600000\n\n[poll]\nnotify = true\n".into();
    outbox.run_ok(&["migrate"]);
    let relay = poll_relay(&outbox, "r");
    wait_for(
        "the poller idle after its first claim",
        Duration::from_secs(30),
        || async {
            relay
                .log_text()
                .contains("serving lock taken")
                .then_some(())
        },
    )
    .await;
    // Let the first (empty) claim pass, so the worker sleeps on the interval.
    let waiting = || async {
        let n: i64 = outbox
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgoutbox' AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        (n > 0).then_some(())
    };
    wait_for("the listener connected", Duration::from_secs(30), waiting).await;
    for round in 0..3 {
        let id = outbox
            .publish(
                "Order",
                Uuid::new_v4(),
                "Placed",
                &serde_json::json!({ "round": round }),
            )
            .await;
        let records = read_until_all(
            vec![outbox.topic("Order")],
            vec![id],
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(missing(&[id], &delivery_counts(&records)), 0);
    }
    relay.terminate();
}

#[tokio::test]
async fn the_heartbeat_keeps_a_lease_shorter_than_the_send_alive() {
    let mut outbox = TestOutbox::new("poll_heartbeat").await;
    // Sends take 5 s to fail (missing topic) but the lease is 2 s: without
    // renewals the reaper (every second) would hand the row to the second
    // worker while the first still waits, counting a second attempt.
    outbox.extra_config = "[outbox]\nlease_seconds = 2\n\n[poll]\nconcurrency = 2\nbackoff_base_ms = 60000\n\n[kafka.properties]\n\"message.timeout.ms\" = \"5000\"\n\"allow.auto.create.topics\" = \"false\"\n".into();
    let id = outbox
        .publish("Missing", Uuid::new_v4(), "Placed", &serde_json::json!({}))
        .await;
    let relay = poll_relay(&outbox, "r");
    let (status, attempts, error): (String, i32, Option<String>) =
        wait_for("the first attempt to fail", Duration::from_secs(60), || async {
            let r = outbox
                .client
                .query_one(
                    &format!("SELECT status, retry_count, last_error FROM {}.outbox WHERE tracking_id = $1", outbox.name),
                    &[&id],
                )
                .await
                .unwrap();
            let error: Option<String> = r.get(2);
            error.is_some().then(|| (r.get(0), r.get(1), error))
        })
        .await;
    let log = relay.log_text();
    relay.terminate();
    assert_eq!(
        status, "PENDING",
        "retriable: back to PENDING with a backoff"
    );
    assert_eq!(attempts, 1, "the lease held for the whole send: {log}");
    assert!(!log.contains("leases expired"), "{log}");
    assert!(error.unwrap().len() > 3);
}

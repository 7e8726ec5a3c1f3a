//! Moving an outbox between poll mode and CDC on a live system, against the
//! real PostgreSQL and Kafka: the serving lock keeps the modes apart, each
//! takes over where the other stopped, and Kafka ends up with every event.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::harness::{
    connect, delivery_counts, missing, read_until_all, wait_for, Relay, TestOutbox,
};
use uuid::Uuid;

/// Inserts one event per transaction until `stop`; returns their ids.
fn spawn_writer(schema: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Uuid>> {
    tokio::spawn(async move {
        let client = connect().await;
        let aggregates: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
        let sql = format!("SELECT {schema}.outbox_publish('Order', $1, 'Placed', $2)");
        let stmt = client.prepare(&sql).await.expect("prepare publish");
        let mut ids = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let payload = serde_json::json!({ "n": n });
            let id: Uuid = client
                .query_one(&stmt, &[&aggregates[n % aggregates.len()], &payload])
                .await
                .expect("publish")
                .get(0);
            ids.push(id);
            n += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    })
}

async fn completed(outbox: &TestOutbox) -> i64 {
    outbox
        .statuses()
        .await
        .get("COMPLETED")
        .copied()
        .unwrap_or(0)
}

async fn wait_more_completed(outbox: &TestOutbox, than: i64) {
    wait_for("more rows completed", Duration::from_secs(60), || async {
        (completed(outbox).await > than + 200).then_some(())
    })
    .await;
}

fn wait_log(relay: &Relay, text: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !relay.log_text().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {text:?} in the log:\n{}",
            relay.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn slot_exists(outbox: &TestOutbox) -> bool {
    outbox
        .client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&outbox.slot()],
        )
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn poll_to_cdc_and_back_under_continuous_inserts_loses_nothing() {
    let mut outbox = TestOutbox::new("switch_live").await;
    outbox.extra_config =
        "[outbox]\nbatch_size = 50\n\n[poll]\nconcurrency = 2\nnotify = true\n".into();
    outbox.run_ok(&["migrate"]);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(outbox.name.clone(), stop.clone());

    // Poll mode serves the table.
    let poll = Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "poll"]),
        "switch_live-poll1",
    );
    wait_more_completed(&outbox, 0).await;

    // A CDC relay started now waits for the pollers, and says so.
    let cdc = Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "cdc"]),
        "switch_live-cdc",
    );
    wait_log(&cdc, "waiting: another relay serves this table");
    assert!(
        !slot_exists(&outbox).await,
        "the waiting CDC relay must not create its slot yet"
    );
    assert!(
        cdc.log_text().contains("pgoutbox-poll"),
        "the wait names the holder: {}",
        cdc.log_text()
    );

    // Poll → CDC: stop the pollers; CDC takes over (backfill, then stream).
    assert!(poll.terminate().success());
    wait_log(&cdc, "serving lock taken");
    let at_switch = completed(&outbox).await;
    wait_more_completed(&outbox, at_switch).await;
    assert!(slot_exists(&outbox).await);

    // CDC → poll: a poller waits while CDC runs, then takes over.
    let poll2 = Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "poll"]),
        "switch_live-poll2",
    );
    wait_log(&poll2, "waiting: another relay serves this table");
    assert!(cdc.terminate().success());
    wait_log(&poll2, "serving lock taken");
    let at_switch = completed(&outbox).await;
    wait_more_completed(&outbox, at_switch).await;

    stop.store(true, Ordering::SeqCst);
    let ids = writer.await.unwrap();
    let n = ids.len() as i64;
    wait_for("every row COMPLETED", Duration::from_secs(60), || async {
        (completed(&outbox).await == n).then_some(())
    })
    .await;
    let log = poll2.log_text();
    assert!(poll2.terminate().success());
    // The poller warns that the CDC slot it replaced still holds WAL.
    assert!(
        log.contains("the CDC replication slot still exists"),
        "{log}"
    );
    let records = read_until_all(
        vec![outbox.topic("Order")],
        ids.clone(),
        Duration::from_secs(60),
    )
    .await;
    let counts = delivery_counts(&records);
    assert_eq!(missing(&ids, &counts), 0, "events lost in a switch");
    let dups: usize = counts.values().map(|c| c - 1).sum();
    eprintln!("{n} events, {dups} delivered twice across two switches");
    // Duplicates come only from rows in flight at a switch.
    assert!(dups <= 200, "{dups} duplicates");
}

#[tokio::test]
async fn auto_mode_polls_when_cdc_is_not_possible_and_says_why() {
    let outbox = TestOutbox::new("switch_auto").await;
    let cdc = Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "auto"]),
        "switch_auto-cdc",
    );
    wait_log(&cdc, "mode auto");
    wait_log(&cdc, "starting CDC relay");
    assert!(cdc.terminate().success());
    // Without the publication, auto falls back to polling and delivers.
    outbox
        .client
        .batch_execute(&format!("DROP PUBLICATION {}_pub", outbox.name))
        .await
        .unwrap();
    let poll = Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "auto"]),
        "switch_auto-poll",
    );
    wait_log(&poll, "starting poll relay");
    let log = poll.log_text();
    assert!(
        log.contains("does not include"),
        "the reason is logged: {log}"
    );
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Placed", &serde_json::json!({}))
        .await;
    let records = read_until_all(
        vec![outbox.topic("Order")],
        vec![id],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(missing(&[id], &delivery_counts(&records)), 0);
    assert!(poll.terminate().success());
}

#[tokio::test]
async fn a_row_redriven_under_cdc_is_published_again_and_completed() {
    let mut outbox = TestOutbox::new("switch_redrive").await;
    outbox.extra_config = "[kafka]\nmessage_max_bytes = 1000\n".into();
    let relay = outbox.start_relay();
    let big = serde_json::json!({ "blob": "x".repeat(2000) });
    let id = outbox
        .publish("Order", Uuid::new_v4(), "Placed", &big)
        .await;
    let small = outbox
        .publish("Order", Uuid::new_v4(), "Placed", &serde_json::json!({}))
        .await;
    read_until_all(
        vec![outbox.topic("Order")],
        vec![small],
        Duration::from_secs(60),
    )
    .await;
    wait_for(
        "the large row dead-lettered",
        Duration::from_secs(30),
        || async { (outbox.statuses().await.get("DEAD_LETTER") == Some(&1)).then_some(()) },
    )
    .await;
    assert!(relay.terminate().success());
    // The operator raises the limit, restarts CDC and redrives the row.
    outbox.extra_config = String::new();
    let relay = outbox.start_relay();
    outbox.run_ok(&[
        "dle",
        "redrive",
        &id.to_string(),
        "--reason",
        "raised kafka.message_max_bytes",
    ]);
    let records = read_until_all(
        vec![outbox.topic("Order")],
        vec![small, id],
        Duration::from_secs(60),
    )
    .await;
    let counts = delivery_counts(&records);
    assert_eq!(counts.get(&id.to_string()), Some(&1));
    let r = records
        .iter()
        .find(|r| r.header("tracking_id") == id.to_string())
        .unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&r.value).unwrap(),
        big
    );
    wait_for(
        "the redriven row COMPLETED",
        Duration::from_secs(30),
        || async { (outbox.statuses().await.get("COMPLETED") == Some(&2)).then_some(()) },
    )
    .await;
    assert!(relay.terminate().success());
}

//! Record formats end to end: a relay with `kafka.format = "debezium"` or
//! `"cloudevents"` against the real services, the records read back with an
//! independent client, and the CloudEvents records read by the CloudEvents
//! SDK's own Kafka binding (Python, `scripts/test-python`).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::harness::{read_topics, run_with_timeout_checked, Record, TestOutbox};
use serde_json::json;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// The rows by tracking id: the payload as PostgreSQL prints it, and
/// `created_at` in microseconds since the epoch (as text).
async fn rows(outbox: &TestOutbox) -> HashMap<String, (String, String)> {
    outbox
        .client
        .query(
            &format!(
                "SELECT tracking_id::text, payload::text, \
                        ((extract(epoch FROM created_at) * 1000000)::bigint)::text FROM {}.outbox",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("read rows")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Reads `topic` until `n` records have the header `id_header`.
async fn read(topic: String, id_header: &'static str, n: usize) -> Vec<Record> {
    tokio::task::spawn_blocking(move || {
        read_topics(&[topic], DEADLINE, |recs| {
            recs.iter()
                .filter(|r| !r.header(id_header).is_empty())
                .count()
                >= n
        })
    })
    .await
    .expect("reader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debezium_format_routes_keys_and_headers_as_the_event_router_does() {
    let mut outbox = TestOutbox::new("fmt_debezium").await;
    let prefix = outbox.topic_prefix.clone();
    outbox.extra_config = format!(
        "[kafka]\nformat = \"debezium\"\n\n[kafka.debezium]\n\
         \"table.field.event.id\" = \"tracking_id\"\n\
         \"table.field.event.key\" = \"aggregate_id\"\n\
         \"route.by.field\" = \"aggregate_type\"\n\
         \"route.topic.replacement\" = \"{prefix}.event.${{routedByValue}}\"\n\
         \"table.fields.additional.placement\" = \"event_type:header:eventType\"\n"
    );
    let relay = outbox.start_relay();
    let agg = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..3 {
        let payload = json!({"n": i, "text": "quote \" and ação"});
        ids.push(outbox.publish("Order", agg, "Placed", &payload).await);
    }
    let records = read(format!("{prefix}.event.Order"), "id", 3).await;
    let rows = rows(&outbox).await;
    assert_eq!(records.len(), 3, "one record per row: {records:?}");
    for (r, id) in records.iter().zip(&ids) {
        assert_eq!(r.header("id"), id.to_string(), "in commit order");
        assert_eq!(r.key, agg.to_string());
        assert_eq!(
            r.value,
            rows[&id.to_string()].0,
            "the payload's text, byte for byte"
        );
        assert_eq!(r.header("eventType"), "Placed");
        let mut names: Vec<&str> = r.headers.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["eventType", "id"], "only the router's headers");
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debezium_format_naming_a_missing_column_stops_at_start_saying_which() {
    let mut outbox = TestOutbox::new("fmt_debezium_bad").await;
    outbox.extra_config = "[kafka]\nformat = \"debezium\"\n".into();
    let out = run_with_timeout_checked(outbox.command_with_args(&["run"]), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("relaying needs the column(s) aggregateid, aggregatetype")
            && stderr.contains("aggregateid by kafka.debezium.table.field.event.key"),
        "{stderr}"
    );
}

/// The CloudEvents SDK's reading of `records`.
fn sdk_reading(records: &[Record], mode: &str) -> Vec<serde_json::Value> {
    let python = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-python"))
        .output()
        .expect("scripts/test-python");
    assert!(
        python.status.success(),
        "scripts/test-python failed: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python = String::from_utf8(python.stdout).unwrap().trim().to_owned();
    let input: Vec<serde_json::Value> = records
        .iter()
        .map(|r| json!({"headers": r.headers, "key": r.key, "value": r.value, "mode": mode}))
        .collect();
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/cloudevents_check.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the SDK check");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the CloudEvents SDK refused the records: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("SDK output")
}

async fn cloudevents_round_trip(mode: &str) {
    let mut outbox = TestOutbox::new(&format!("fmt_ce_{mode}")).await;
    outbox.extra_config = format!(
        "[kafka]\nformat = \"cloudevents\"\n\n[kafka.cloudevents]\nmode = \"{mode}\"\nsource = \"urn:test:{{table}}\"\n"
    );
    let relay = outbox.start_relay();
    let agg = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            outbox
                .publish("Cart", agg, "ItemAdded", &json!({"sku": i, "name": "ação"}))
                .await,
        );
    }
    let id_header = if mode == "binary" {
        "ce_id"
    } else {
        "content-type"
    };
    let records = read(outbox.topic("Cart"), id_header, 3).await;
    assert_eq!(records.len(), 3);
    let rows = rows(&outbox).await;
    let events = sdk_reading(&records, mode);
    for (event, id) in events.iter().zip(&ids) {
        let a = &event["attributes"];
        let (payload, created_micros) = &rows[&id.to_string()];
        assert_eq!(a["id"], id.to_string(), "in commit order: {event}");
        assert_eq!(a["specversion"], "1.0");
        assert_eq!(a["type"], "ItemAdded");
        assert_eq!(a["source"], "urn:test:outbox");
        assert_eq!(a["subject"], agg.to_string());
        assert_eq!(a["time"], created_micros.as_str(), "ce time is created_at");
        let expected: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(event["data"], expected);
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_binary_records_are_read_by_the_cloudevents_sdk() {
    cloudevents_round_trip("binary").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_structured_records_are_read_by_the_cloudevents_sdk() {
    cloudevents_round_trip("structured").await;
}

//! Outbox tables pgoutbox did not create, end to end against the real
//! services: Debezium's default outbox table relayed in Debezium's record
//! format with no mapping but the preset, and a home-grown table (text event
//! id, bigint aggregate id, bytea payload, no event type) mapped through
//! `[outbox.columns]`, given the poll columns by `pgoutbox adopt`, polled,
//! then relayed by CDC with marking. `migrate` never alters either table.

mod common;

use std::process::Output;
use std::time::Duration;

use common::harness::{
    read_topics, relay_password, wait_for, Record, Relay, TestOutbox, RELAY_ROLE,
};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `pgoutbox <args>` as the admin role; returns its output.
fn admin(outbox: &TestOutbox, args: &[&str]) -> Output {
    let mut cmd = outbox.admin_command();
    cmd.args(args);
    common::harness::output_checked(&mut cmd)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The table's columns and types, to show that nothing altered it.
async fn columns(outbox: &TestOutbox, table: &str) -> Vec<(String, String)> {
    outbox
        .client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
              WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&format!("{}.{table}", outbox.name)],
        )
        .await
        .expect("read columns")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Reads `topic` until `done` holds.
async fn read(topic: String, done: impl Fn(&[Record]) -> bool + Send + 'static) -> Vec<Record> {
    tokio::task::spawn_blocking(move || read_topics(&[topic], DEADLINE, done))
        .await
        .expect("reader")
}

/// Runs `pgoutbox adopt <args> --relay-role …` as the admin role.
fn adopt(outbox: &TestOutbox, args: &[&str]) -> Output {
    let mut cmd = outbox.admin_command();
    cmd.arg("adopt")
        .args(args)
        .args(["--relay-role", RELAY_ROLE])
        .env("PGOUTBOX_RELAY_PASSWORD", relay_password());
    common::harness::output_checked(&mut cmd)
}

/// Starts `pgoutbox run` as the relay's least-privilege role, which only
/// `adopt --relay-role` granted anything on the adopted table.
fn start(outbox: &TestOutbox, mode: &str) -> Relay {
    let mut cmd = outbox.command();
    cmd.args(["run", "--mode", mode]);
    Relay::spawn(cmd, &format!("{}-{mode}", outbox.name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debeziums_default_table_is_adopted_and_relayed_in_debeziums_format() {
    let mut outbox = TestOutbox::new("shape_dbz").await;
    let schema = outbox.name.clone();
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.dbz_outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
               aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb, tracingspancontext text)"
        ))
        .await
        .unwrap();
    let before = columns(&outbox, "dbz_outbox").await;
    let insert = |id: Uuid, payload: &str, trace: Option<&str>| {
        let sql = format!(
            "INSERT INTO {schema}.dbz_outbox VALUES ($1, 'Order', 'order-7', 'OrderCreated', $2::text::jsonb, $3)"
        );
        let (payload, trace) = (payload.to_owned(), trace.map(str::to_owned));
        let client = &outbox.client;
        async move {
            client
                .execute(&sql, &[&id, &payload, &trace])
                .await
                .unwrap()
        }
    };
    let old = Uuid::new_v4();
    insert(old, r#"{"n": 0}"#, None).await;

    // migrate refuses both ways, touching nothing.
    outbox.extra_config = "[outbox]\ntable = \"dbz_outbox\"\n".into();
    let out = admin(&outbox, &["migrate"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("was not created by `pgoutbox migrate`"),
        "{}",
        text(&out.stderr)
    );
    outbox.extra_config = format!(
        "[outbox]\ntable = \"dbz_outbox\"\nmark_completed = false\n\n[outbox.columns]\npreset = \"debezium\"\n\n\
         [kafka]\nformat = \"debezium\"\n\n[kafka.debezium]\n\"route.topic.replacement\" = \"{}.${{routedByValue}}\"\n",
        outbox.topic_prefix
    );
    let out = admin(&outbox, &["migrate"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("run `pgoutbox adopt`"),
        "{}",
        text(&out.stderr)
    );

    // The check says what the table can and cannot do, and changes nothing.
    let out = admin(&outbox, &["adopt", "--check"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(report.contains("relaying: ok"), "{report}");
    assert!(
        report.contains("marking: not possible, missing id (an integer; this table's is uuid), created_at, status"),
        "{report}"
    );
    assert!(report.contains("poll mode: not possible"), "{report}");
    assert!(
        report.contains("publication: does not cover the table"),
        "{report}"
    );

    // Poll mode is refused, naming what is missing.
    let out = admin(&outbox, &["run", "--mode", "poll"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "cannot be relayed in poll mode: poll mode needs the column(s) id (an integer"
        ),
        "{err}"
    );

    let out = adopt(&outbox, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("publication: covers the table"),
        "{}",
        text(&out.stdout)
    );
    let mut relay = start(&outbox, "cdc");
    let slot = outbox.slot();
    wait_for("the relay's slot to stream", DEADLINE, || {
        let client = &outbox.client;
        let slot = slot.clone();
        async move {
            client
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                    &[&slot],
                )
                .await
                .unwrap()
                .map(|_| ())
        }
    })
    .await;
    let traced = Uuid::new_v4();
    let plain = Uuid::new_v4();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    insert(
        traced,
        r#"{"n": 1, "s": "é\n"}"#,
        Some(&format!("#span\ntraceparent={traceparent}\n")),
    )
    .await;
    insert(plain, r#"{"n": 2}"#, None).await;
    let topic = format!("{}.Order", outbox.topic_prefix);
    let want = plain.to_string();
    let records = read(topic.clone(), move |recs| {
        recs.iter().any(|r| r.header("id") == want)
    })
    .await;
    assert!(relay.running(), "{}", relay.log_text());
    assert!(
        relay.log_text().contains("they are not backfilled"),
        "the relay says rows already there are not relayed: {}",
        relay.log_text()
    );
    // One key, one partition: a backfilled old row would come first.
    let ids: Vec<&str> = records.iter().map(|r| r.header("id")).collect();
    assert_eq!(
        ids,
        [traced.to_string(), plain.to_string()],
        "only rows inserted after the slot, in order"
    );
    let payload: String = outbox
        .client
        .query_one(
            &format!("SELECT payload::text FROM {schema}.dbz_outbox WHERE id = $1"),
            &[&traced],
        )
        .await
        .unwrap()
        .get(0);
    let r = &records[0];
    assert_eq!(
        (r.topic.as_str(), r.key.as_str(), r.value.as_str()),
        (topic.as_str(), "order-7", payload.as_str())
    );
    let mut names: Vec<&str> = r.headers.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["id", "traceparent"]);
    assert_eq!(r.header("traceparent"), traceparent);
    assert_eq!(
        records[1].headers.len(),
        1,
        "no trace context, no traceparent"
    );
    // A row that can never be published (no legal topic) cannot be marked
    // here: it is recorded in pgoutbox_dead_letters and the stream moves on;
    // a NULL payload is a record without a value.
    let (unroutable, empty) = (Uuid::new_v4(), Uuid::new_v4());
    outbox
        .client
        .execute(
            &format!(
                "INSERT INTO {schema}.dbz_outbox (id, aggregatetype, aggregateid, type, payload) \
                 VALUES ($1, 'no topic!', 'order-7', 'X', '{{}}'), ($2, 'Order', 'order-7', 'Deleted', NULL)"
            ),
            &[&unroutable, &empty],
        )
        .await
        .unwrap();
    let want = empty.to_string();
    let records = read(topic.clone(), move |recs| {
        recs.iter().any(|r| r.header("id") == want)
    })
    .await;
    let last = records.last().unwrap();
    assert_eq!(
        (last.header("id"), last.value.as_str()),
        (empty.to_string().as_str(), "")
    );
    let dead: String = wait_for("the unroutable row in pgoutbox_dead_letters", DEADLINE, || {
        let client = &outbox.client;
        let sql = format!(
            "SELECT convert_from(content, 'UTF8') FROM {schema}.pgoutbox_dead_letters WHERE prefix = 'row:dbz_outbox'"
        );
        async move {
            client
                .query_opt(&sql, &[])
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    })
    .await;
    assert!(dead.contains(&unroutable.to_string()), "{dead}");
    assert!(relay.running(), "{}", relay.log_text());

    let out = admin(&outbox, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["rows"].is_null(),
        "no status column, no row counts: {status}"
    );
    assert_eq!(status["mode"]["serving"], "cdc", "{status}");
    relay.terminate();
    assert_eq!(
        columns(&outbox, "dbz_outbox").await,
        before,
        "the table was never altered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_home_grown_table_is_mapped_given_poll_columns_polled_and_marked_by_cdc() {
    let mut outbox = TestOutbox::new("shape_own").await;
    let schema = outbox.name.clone();
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {schema}.events (id bigserial PRIMARY KEY, event_uuid text NOT NULL, kind text NOT NULL, \
               agg bigint NOT NULL, body bytea NOT NULL);
             INSERT INTO {schema}.events (event_uuid, kind, agg, body) VALUES ('delivered-before', 'Invoice', 1, '\\x7b7d')"
        ))
        .await
        .unwrap();
    outbox.extra_config = "[outbox]\ntable = \"events\"\n\n[outbox.columns]\nevent_id = \"event_uuid\"\n\
         aggregate_type = \"kind\"\naggregate_id = \"agg\"\npayload = \"body\"\nevent_type = \"\"\ntimestamp = \"\"\n\
         trace_context = \"\"\n".into();
    let out = admin(&outbox, &["adopt", "--check"]);
    let report = text(&out.stdout);
    assert!(report.contains("relaying: ok"), "{report}");
    assert!(
        report.contains("poll mode: not possible, missing created_at, status"),
        "{report}"
    );
    let out = adopt(&outbox, &["--add-poll-columns"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains("poll mode: ok") && report.contains("marking: ok"),
        "{report}"
    );
    let status: String = outbox
        .client
        .query_one(
            &format!("SELECT status FROM {schema}.events WHERE event_uuid = 'delivered-before'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "COMPLETED", "rows already there count as delivered");

    let insert = |uuid: &'static str, body: &'static str| {
        let sql = format!(
            "INSERT INTO {schema}.events (event_uuid, kind, agg, body) VALUES ($1, 'Invoice', 9000000000, convert_to($2, 'UTF8'))"
        );
        let client = &outbox.client;
        async move { client.execute(&sql, &[&uuid, &body]).await.unwrap() }
    };
    let status_of = |uuid: &'static str| {
        let sql = format!("SELECT status FROM {schema}.events WHERE event_uuid = $1");
        let client = &outbox.client;
        async move {
            let s: String = client.query_one(&sql, &[&uuid]).await.unwrap().get(0);
            (s == "COMPLETED").then_some(())
        }
    };
    insert("polled-1", r#"{"n": 1}"#).await;
    insert("polled-2", "plain text, not JSON").await;
    let poll = start(&outbox, "poll");
    wait_for("poll mode to complete both rows", DEADLINE, || async {
        status_of("polled-1").await?;
        status_of("polled-2").await
    })
    .await;
    poll.terminate();

    insert("streamed-1", r#"{"n": 3}"#).await;
    let cdc = start(&outbox, "cdc");
    wait_for("CDC to backfill and mark the pending row", DEADLINE, || {
        status_of("streamed-1")
    })
    .await;
    insert("streamed-2", r#"{"n": 4}"#).await;
    wait_for("CDC to stream and mark the new row", DEADLINE, || {
        status_of("streamed-2")
    })
    .await;
    cdc.terminate();

    let topic = format!("{}.Invoice", outbox.topic_prefix);
    let records = read(topic, |recs| recs.len() >= 4).await;
    let got: Vec<(&str, &str, &str)> = records
        .iter()
        .map(|r| (r.header("tracking_id"), r.key.as_str(), r.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("polled-1", "9000000000", r#"{"n": 1}"#),
            ("polled-2", "9000000000", "plain text, not JSON"),
            ("streamed-1", "9000000000", r#"{"n": 3}"#),
            ("streamed-2", "9000000000", r#"{"n": 4}"#),
        ],
        "the bytea payload's bytes, the bigint key; the row delivered before is not sent"
    );
    assert_eq!(records[0].header("event_type"), "", "no event type column");
}

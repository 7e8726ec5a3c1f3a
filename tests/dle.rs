//! `pgoutbox dle`: listing, showing, redriving and skipping dead-lettered
//! rows against the real PostgreSQL, through the binary.

mod common;

use std::collections::HashSet;
use std::process::Output;

use common::harness::TestOutbox;
use serde_json::{json, Value};
use uuid::Uuid;

/// A row to insert directly.
struct Row<'a> {
    aggregate_type: &'a str,
    event_type: &'a str,
    status: &'a str,
    retry_count: i32,
    last_error: Option<&'a str>,
    /// How long ago it was created.
    age_secs: f64,
}

impl Default for Row<'_> {
    fn default() -> Self {
        Row {
            aggregate_type: "Order",
            event_type: "OrderCreated",
            status: "DEAD_LETTER",
            retry_count: 5,
            last_error: Some("broker: message too large"),
            age_secs: 0.0,
        }
    }
}

async fn insert(outbox: &TestOutbox, row: Row<'_>) -> Uuid {
    insert_with(outbox, row, &json!({"n": 1}), &json!({})).await
}

async fn insert_with(outbox: &TestOutbox, row: Row<'_>, payload: &Value, metadata: &Value) -> Uuid {
    outbox
        .client
        .query_one(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, metadata, \
                   status, retry_count, last_error, created_at, processed_at, locked_until, lock_token) \
                 VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, $6, $7, \
                   now() - make_interval(secs => $8::float8), \
                   CASE WHEN $5 = 'PENDING' THEN NULL ELSE now() END, \
                   CASE WHEN $5 = 'DEAD_LETTER' THEN now() END, \
                   CASE WHEN $5 = 'DEAD_LETTER' THEN 7 END) \
                 RETURNING tracking_id",
                outbox.name
            ),
            &[
                &row.aggregate_type,
                &row.event_type,
                payload,
                metadata,
                &row.status,
                &row.retry_count,
                &row.last_error,
                &row.age_secs,
            ],
        )
        .await
        .expect("insert an outbox row")
        .get(0)
}

/// (status, retry_count, last_error, processed_at IS NULL, locked_until IS NULL)
async fn state(outbox: &TestOutbox, id: Uuid) -> (String, i32, Option<String>, bool, bool) {
    let r = outbox
        .client
        .query_one(
            &format!(
                "SELECT status, retry_count, last_error, processed_at IS NULL, locked_until IS NULL \
                   FROM {}.outbox WHERE tracking_id = $1",
                outbox.name
            ),
            &[&id],
        )
        .await
        .expect("read a row");
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

/// (action, table_name, performed_by, reason, tracking_ids, row_count), oldest first.
async fn audit(outbox: &TestOutbox) -> Vec<(String, String, String, String, Vec<Uuid>, i32)> {
    outbox
        .client
        .query(
            &format!(
                "SELECT action, table_name, performed_by, reason, tracking_ids, row_count \
                   FROM {}.pgoutbox_dead_letter_actions ORDER BY id",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("read the audit table")
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

async fn current_user(outbox: &TestOutbox) -> String {
    outbox
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

fn run(outbox: &TestOutbox, args: &[&str]) -> Output {
    let mut full = vec!["dle"];
    full.extend_from_slice(args);
    outbox
        .command_with_args(&full)
        .output()
        .expect("run pgoutbox dle")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "pgoutbox dle failed:\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(out)
}

/// Asserts failure with a one-line `error: …` as the last stderr line; returns it.
fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure:\nstdout:\n{}\nstderr:\n{stderr}",
        stdout(out)
    );
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("error: "),
        "ends with an error line:\n{stderr}"
    );
    // The error is exactly one line: nothing after it, and the line before it
    // (if any) is the log record, not a continuation.
    let error_lines = stderr.lines().filter(|l| l.starts_with("error: ")).count();
    assert_eq!(error_lines, 1, "one error line:\n{stderr}");
    last
}

fn json_out(out: &Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[tokio::test]
async fn redrive_without_a_reason_is_refused_and_changes_nothing() {
    let outbox = TestOutbox::new("dle_reason").await;
    let a = insert(&outbox, Row::default()).await;
    let b = insert(&outbox, Row::default()).await;

    let line = refused(&run(&outbox, &["redrive", &a.to_string(), &b.to_string()]));
    assert!(
        line.contains("--reason") && line.contains("blind"),
        "{line}"
    );
    let line = refused(&run(
        &outbox,
        &["redrive", &a.to_string(), "--reason", "  \t "],
    ));
    assert!(line.contains("--reason"), "{line}");
    let line = refused(&run(&outbox, &["redrive", "--where", "true"]));
    assert!(line.contains("--reason"), "{line}");
    let line = refused(&run(&outbox, &["skip", &a.to_string()]));
    assert!(line.contains("--reason") && line.contains("skip"), "{line}");

    for id in [a, b] {
        let (status, retries, err, _, _) = state(&outbox, id).await;
        assert_eq!(status, "DEAD_LETTER");
        assert_eq!(retries, 5);
        assert_eq!(err.as_deref(), Some("broker: message too large"));
    }
    assert!(audit(&outbox).await.is_empty());
}

#[tokio::test]
async fn redrive_resets_the_rows_and_records_who_when_and_why() {
    let outbox = TestOutbox::new("dle_redrive").await;
    let a = insert(&outbox, Row::default()).await;
    let b = insert(&outbox, Row::default()).await;
    let untouched = insert(&outbox, Row::default()).await;
    let pending = insert(
        &outbox,
        Row {
            status: "PENDING",
            retry_count: 2,
            ..Row::default()
        },
    )
    .await;
    let unknown = Uuid::new_v4();
    let reason = "max.message.bytes raised to 4MB on the broker (INC-42)";

    let text = ok(&run(
        &outbox,
        &[
            "redrive",
            &a.to_string(),
            &b.to_string(),
            &pending.to_string(),
            &unknown.to_string(),
            "--reason",
            reason,
        ],
    ));
    assert!(text.contains("redrove 2"), "{text}");
    // The ids that were not dead-lettered are named.
    let not_part = text.split("not redriven").nth(1).unwrap_or_default();
    assert!(
        not_part.contains(&pending.to_string()) && not_part.contains(&unknown.to_string()),
        "{text}"
    );

    for id in [a, b] {
        let (status, retries, err, processed_null, lock_null) = state(&outbox, id).await;
        assert_eq!(status, "PENDING");
        assert_eq!(retries, 0);
        assert!(
            processed_null && lock_null,
            "lease and processed_at cleared"
        );
        // last_error is kept as history.
        assert_eq!(err.as_deref(), Some("broker: message too large"));
    }
    assert_eq!(state(&outbox, untouched).await.0, "DEAD_LETTER");
    assert_eq!(state(&outbox, untouched).await.1, 5);
    assert_eq!(
        state(&outbox, pending).await.1,
        2,
        "a PENDING row is not reset"
    );

    let entries = audit(&outbox).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let (action, table, by, why, ids, count) = &entries[0];
    assert_eq!(action, "redrive");
    assert_eq!(table, "outbox");
    assert_eq!(by, &current_user(&outbox).await);
    assert_eq!(why, reason);
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([a, b])
    );
    assert_eq!(*count, 2);

    // Again: nothing is dead-lettered any more, so it fails and says which.
    let line = refused(&run(
        &outbox,
        &["redrive", &a.to_string(), "--reason", reason],
    ));
    assert!(
        line.contains(&a.to_string()) && line.contains("nothing"),
        "{line}"
    );
    assert_eq!(audit(&outbox).await.len(), 1, "no audit entry for nothing");
}

#[tokio::test]
async fn redrive_where_touches_only_matching_dead_letters() {
    let outbox = TestOutbox::new("dle_where").await;
    let shipped = Row {
        event_type: "OrderShipped",
        ..Row::default()
    };
    let s1 = insert(&outbox, shipped).await;
    let s2 = insert(
        &outbox,
        Row {
            event_type: "OrderShipped",
            ..Row::default()
        },
    )
    .await;
    let created = insert(&outbox, Row::default()).await;
    let pending = insert(
        &outbox,
        Row {
            event_type: "OrderShipped",
            status: "PENDING",
            retry_count: 3,
            ..Row::default()
        },
    )
    .await;
    let completed = insert(
        &outbox,
        Row {
            event_type: "OrderShipped",
            status: "COMPLETED",
            retry_count: 2,
            ..Row::default()
        },
    )
    .await;
    let condition = "event_type = 'OrderShipped'";

    // Dry run: counted, nothing changed, nothing audited.
    let text = ok(&run(
        &outbox,
        &[
            "redrive",
            "--where",
            condition,
            "--reason",
            "topic created",
            "--dry-run",
        ],
    ));
    assert!(text.contains("would redrive 2"), "{text}");
    assert_eq!(state(&outbox, s1).await.0, "DEAD_LETTER");
    assert!(audit(&outbox).await.is_empty());

    // An attempt to escape the parentheses is refused.
    let line = refused(&run(
        &outbox,
        &[
            "redrive",
            "--where",
            "event_type = 'x') OR (true",
            "--reason",
            "r",
        ],
    ));
    assert!(
        line.contains("--where") && line.contains("parenthes"),
        "{line}"
    );

    let out = json_out(&run(
        &outbox,
        &[
            "redrive",
            "--where",
            condition,
            "--reason",
            "topic created",
            "--json",
        ],
    ));
    assert_eq!(out["tracking_ids"].as_array().unwrap().len(), 2, "{out}");

    for id in [s1, s2] {
        let (status, retries, ..) = state(&outbox, id).await;
        assert_eq!((status.as_str(), retries), ("PENDING", 0));
    }
    assert_eq!(state(&outbox, created).await.0, "DEAD_LETTER");
    let (status, retries, ..) = state(&outbox, pending).await;
    assert_eq!((status.as_str(), retries), ("PENDING", 3));
    let (status, retries, ..) = state(&outbox, completed).await;
    assert_eq!((status.as_str(), retries), ("COMPLETED", 2));

    let entries = audit(&outbox).await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].4.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([s1, s2])
    );

    // Matching nothing is an error.
    let line = refused(&run(
        &outbox,
        &["redrive", "--where", condition, "--reason", "again"],
    ));
    assert!(
        line.contains("--where") && line.contains("nothing"),
        "{line}"
    );
}

#[tokio::test]
async fn where_with_a_semicolon_or_bad_sql_is_refused() {
    let outbox = TestOutbox::new("dle_semicolon").await;
    let a = insert(&outbox, Row::default()).await;
    let victim = insert(
        &outbox,
        Row {
            status: "COMPLETED",
            ..Row::default()
        },
    )
    .await;

    let drop_it = format!("true; DELETE FROM {}.outbox", outbox.name);
    let line = refused(&run(
        &outbox,
        &["redrive", "--where", &drop_it, "--reason", "r"],
    ));
    assert!(line.contains("--where") && line.contains(';'), "{line}");
    let line = refused(&run(
        &outbox,
        &["skip", "--where", "true -- all", "--reason", "r"],
    ));
    assert!(line.contains("comment"), "{line}");
    let line = refused(&run(
        &outbox,
        &["redrive", "--where", "no_such_column = 1", "--reason", "r"],
    ));
    assert!(
        line.contains("no_such_column") && line.contains("--where"),
        "{line}"
    );

    assert_eq!(state(&outbox, a).await.0, "DEAD_LETTER");
    assert_eq!(state(&outbox, victim).await.0, "COMPLETED");
    assert!(audit(&outbox).await.is_empty());
}

#[tokio::test]
async fn list_filters_and_counts_by_error() {
    let outbox = TestOutbox::new("dle_list").await;
    // Old rows may fall in last month near a month boundary.
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {s}.outbox_prev PARTITION OF {s}.outbox FOR VALUES \
               FROM (date_trunc('month', (now() AT TIME ZONE 'UTC') - interval '1 month') AT TIME ZONE 'UTC') \
               TO (date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')",
            s = outbox.name
        ))
        .await
        .expect("create last month's partition");
    let mut large = Vec::new();
    for i in 0..3 {
        large.push(
            insert(
                &outbox,
                Row {
                    age_secs: 60.0 * f64::from(i),
                    ..Row::default()
                },
            )
            .await,
        );
    }
    let cart = insert(
        &outbox,
        Row {
            aggregate_type: "Cart",
            event_type: "CartUpdated",
            last_error: Some("unknown topic or partition"),
            age_secs: 300.0,
            ..Row::default()
        },
    )
    .await;
    let old = insert(
        &outbox,
        Row {
            event_type: "OrderShipped",
            last_error: Some("unknown topic or partition\n  at producer.rs:42"),
            age_secs: 2.0 * 3600.0,
            ..Row::default()
        },
    )
    .await;
    let _pending = insert(
        &outbox,
        Row {
            status: "PENDING",
            ..Row::default()
        },
    )
    .await;

    let all = json_out(&run(&outbox, &["list", "--json"]));
    assert_eq!(all["total"], 5, "{all}");
    let rows: Vec<String> = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["tracking_id"].as_str().unwrap().to_owned())
        .collect();
    // Newest first.
    let expected: Vec<String> = [large[0], large[1], large[2], cart, old]
        .iter()
        .map(Uuid::to_string)
        .collect();
    assert_eq!(rows, expected);
    let groups: Vec<(String, i64)> = all["by_error"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["error"].as_str().unwrap().to_owned(),
                g["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("broker: message too large".to_owned(), 3),
            ("unknown topic or partition".to_owned(), 2),
        ]
    );

    let orders = json_out(&run(
        &outbox,
        &["list", "--aggregate-type", "Order", "--json"],
    ));
    assert_eq!(orders["total"], 4, "{orders}");
    assert!(orders["rows"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["aggregate_type"] == "Order"));

    let carts = json_out(&run(
        &outbox,
        &["list", "--event-type", "CartUpdated", "--json"],
    ));
    assert_eq!(carts["total"], 1);
    assert_eq!(carts["rows"][0]["tracking_id"], cart.to_string());

    let aged = json_out(&run(&outbox, &["list", "--older-than", "1h", "--json"]));
    assert_eq!(aged["total"], 1, "{aged}");
    assert_eq!(aged["rows"][0]["tracking_id"], old.to_string());
    assert_eq!(aged["by_error"][0]["error"], "unknown topic or partition");

    let limited = json_out(&run(&outbox, &["list", "--limit", "2", "--json"]));
    assert_eq!(limited["total"], 5);
    assert_eq!(limited["rows"].as_array().unwrap().len(), 2);

    // The table: every row, errors on one line, counts.
    let text = ok(&run(&outbox, &["list"]));
    for id in large.iter().chain([&cart, &old]) {
        assert!(text.contains(&id.to_string()), "{text}");
    }
    assert!(
        !text.contains("producer.rs:42"),
        "one line per error:\n{text}"
    );
    assert!(text.contains("5/5"), "{text}");
    assert!(text.contains("BY ERROR"), "{text}");
    let count_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("3 ") && l.contains("message too large"));
    assert!(count_line.is_some(), "{text}");

    let none = ok(&run(&outbox, &["list", "--aggregate-type", "Nope"]));
    assert!(none.contains("no dead-lettered rows"), "{none}");
    refused(&run(&outbox, &["list", "--limit", "0"]));
}

#[tokio::test]
async fn show_prints_payload_metadata_and_last_error() {
    let outbox = TestOutbox::new("dle_show").await;
    let payload = json!({"total": 42, "items": [{"sku": "A-1", "qty": 2}]});
    let metadata =
        json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"});
    let id = insert_with(
        &outbox,
        Row {
            retry_count: 3,
            last_error: Some(
                "permanent: schema registry rejected the value\nfield total: expected string",
            ),
            ..Row::default()
        },
        &payload,
        &metadata,
    )
    .await;

    let text = ok(&run(&outbox, &["show", &id.to_string()]));
    assert!(text.contains(&id.to_string()), "{text}");
    assert!(text.contains("\"total\": 42"), "{text}");
    assert!(text.contains("\"sku\": \"A-1\""), "{text}");
    assert!(text.contains("0af7651916cd43dd8448eb211c80319c"), "{text}");
    assert!(
        text.contains("schema registry rejected the value")
            && text.contains("field total: expected string"),
        "{text}"
    );
    assert!(text.contains("3/5"), "{text}");

    let shown = json_out(&run(&outbox, &["show", &id.to_string(), "--json"]));
    assert_eq!(shown["payload"], payload);
    assert_eq!(shown["metadata"], metadata);
    assert_eq!(shown["retry_count"], 3);
    assert_eq!(
        shown["last_error"],
        "permanent: schema registry rejected the value\nfield total: expected string"
    );
    assert_eq!(shown["history"], json!([]));

    // Redriven, dead-lettered again: show tells the history.
    ok(&run(
        &outbox,
        &[
            "redrive",
            &id.to_string(),
            "--reason",
            "registry schema v7 deployed",
        ],
    ));
    outbox
        .client
        .execute(
            &format!(
                "UPDATE {}.outbox SET status = 'DEAD_LETTER', retry_count = 5 WHERE tracking_id = $1",
                outbox.name
            ),
            &[&id],
        )
        .await
        .unwrap();
    let text = ok(&run(&outbox, &["show", &id.to_string()]));
    assert!(text.contains("registry schema v7 deployed"), "{text}");

    let missing = Uuid::new_v4();
    let line = refused(&run(&outbox, &["show", &missing.to_string()]));
    assert!(
        line.contains(&missing.to_string()) && line.contains("DEAD_LETTER"),
        "{line}"
    );
}

#[tokio::test]
async fn skip_completes_without_processed_at_and_is_audited() {
    let outbox = TestOutbox::new("dle_skip").await;
    let a = insert(&outbox, Row::default()).await;
    let b = insert(
        &outbox,
        Row {
            aggregate_type: "Cart",
            ..Row::default()
        },
    )
    .await;
    let reason = "obsolete event type, consumers retired (CHG-7)";

    let text = ok(&run(&outbox, &["skip", &a.to_string(), "--reason", reason]));
    assert!(text.contains("skipped 1"), "{text}");

    let (status, _, err, processed_null, lock_null) = state(&outbox, a).await;
    assert_eq!(status, "COMPLETED");
    assert!(processed_null, "a skipped row has no processed_at");
    assert!(lock_null);
    assert_eq!(
        err.as_deref(),
        Some(format!("skipped by operator: {reason}").as_str())
    );
    assert_eq!(state(&outbox, b).await.0, "DEAD_LETTER");

    let entries = audit(&outbox).await;
    assert_eq!(entries.len(), 1);
    let (action, _, by, why, ids, count) = &entries[0];
    assert_eq!(action, "skip");
    assert_eq!(by, &current_user(&outbox).await);
    assert_eq!(why, reason);
    assert_eq!(ids, &vec![a]);
    assert_eq!(*count, 1);

    // A skipped row is no longer a dead letter: redrive refuses it.
    let line = refused(&run(
        &outbox,
        &["redrive", &a.to_string(), "--reason", "oops"],
    ));
    assert!(line.contains(&a.to_string()), "{line}");

    // By condition.
    ok(&run(
        &outbox,
        &[
            "skip",
            "--where",
            "aggregate_type = 'Cart'",
            "--reason",
            reason,
        ],
    ));
    assert_eq!(state(&outbox, b).await.0, "COMPLETED");
    let entries = audit(&outbox).await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[1].4, vec![b]);
}

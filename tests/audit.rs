//! The opt-in status audit (`pgoutbox migrate --audit`, `[outbox] audit`,
//! `ENABLE_AUDIT`): what the relays (running as the least-privileged relay
//! role) and `pgoutbox dle` leave in `<table>_status_audit`, and that turning
//! it off stops the recording but keeps the history.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::harness::{wait_for, Relay, TestOutbox, RELAY_ROLE};
use uuid::Uuid;

/// One audit row: (from_status, to_status, changed_by, retry_count, last_error).
type Transition = (String, String, String, i32, Option<String>);

/// Every audit row, by tracking id, oldest first.
async fn transitions(outbox: &TestOutbox) -> HashMap<Uuid, Vec<Transition>> {
    let mut out: HashMap<Uuid, Vec<Transition>> = HashMap::new();
    for r in outbox
        .client
        .query(
            &format!(
                "SELECT tracking_id, from_status, to_status, changed_by, retry_count, last_error \
                   FROM {}.outbox_status_audit ORDER BY id",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("read the audit table")
    {
        out.entry(r.get(0))
            .or_default()
            .push((r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)));
    }
    out
}

/// `from>to` of each transition.
fn path(ts: &[Transition]) -> Vec<String> {
    ts.iter().map(|t| format!("{}>{}", t.0, t.1)).collect()
}

async fn audit_rows(outbox: &TestOutbox) -> i64 {
    outbox
        .client
        .query_one(
            &format!("SELECT count(*) FROM {}.outbox_status_audit", outbox.name),
            &[],
        )
        .await
        .expect("count audit rows")
        .get(0)
}

async fn trigger_installed(outbox: &TestOutbox) -> bool {
    outbox
        .client
        .query_one(
            "SELECT count(*) > 0 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = 'pgoutbox_status_audit'",
            &[&format!("{}.outbox", outbox.name)],
        )
        .await
        .unwrap()
        .get(0)
}

async fn audit_table_exists(outbox: &TestOutbox) -> bool {
    outbox
        .client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.outbox_status_audit", outbox.name)],
        )
        .await
        .unwrap()
        .get(0)
}

/// Runs `pgoutbox migrate` (as the admin, with `--relay-role`) with `args`
/// and extra environment; panics on failure.
fn migrate(outbox: &TestOutbox, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut full = vec!["migrate"];
    full.extend_from_slice(args);
    let mut cmd = outbox.command_with_args(&full);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = common::harness::output_checked(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "pgoutbox migrate {args:?} failed: {stderr}"
    );
    stderr
}

/// Inserts `n` events in one statement; returns their tracking ids.
async fn insert_events(outbox: &TestOutbox, n: i64) -> Vec<Uuid> {
    outbox
        .client
        .query(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                 SELECT gen_random_uuid(), 'Order', 'Happened', jsonb_build_object('seq', g) \
                   FROM generate_series(1, $1::bigint) AS g RETURNING tracking_id",
                outbox.name
            ),
            &[&n],
        )
        .await
        .expect("insert events")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_completed(outbox: &TestOutbox, n: i64) {
    wait_for("every row COMPLETED", Duration::from_secs(90), || async {
        let s = outbox.statuses().await;
        (s.get("COMPLETED").copied().unwrap_or(0) == n).then_some(())
    })
    .await;
}

fn poll_relay(outbox: &TestOutbox, label: &str) -> Relay {
    Relay::spawn(
        outbox.command_with_args(&["run", "--mode", "poll"]),
        &format!("{}-{label}", outbox.name),
    )
}

async fn admin_user(outbox: &TestOutbox) -> String {
    outbox
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn cdc_relay_records_pending_to_completed_for_every_event_until_audit_is_turned_off() {
    let outbox = TestOutbox::new("audit_cdc").await;
    assert!(!audit_table_exists(&outbox).await, "the audit is opt-in");

    // The seed's flag turns it on; a later plain migrate leaves it on.
    let log = migrate(&outbox, &[], &[("ENABLE_AUDIT", "true")]);
    assert!(log.contains("created the status audit trigger"), "{log}");
    migrate(&outbox, &[], &[]);
    assert!(trigger_installed(&outbox).await, "plain migrate keeps it");

    let ids = insert_events(&outbox, 300).await;
    let relay = outbox.start_relay();
    wait_completed(&outbox, 300).await;
    assert!(relay.terminate().success());

    let audit = transitions(&outbox).await;
    assert_eq!(audit.len(), ids.len(), "one history per event");
    for id in &ids {
        let ts = &audit[id];
        assert_eq!(path(ts), ["PENDING>COMPLETED"], "{id}: {ts:?}");
        assert_eq!(ts[0].2, RELAY_ROLE, "changed_by is the relay's role");
    }
    // The audit row names the outbox row it describes.
    let mismatched: i64 = outbox
        .client
        .query_one(
            &format!(
                "SELECT count(*) FROM {0}.outbox_status_audit a LEFT JOIN {0}.outbox o \
                   ON o.id = a.outbox_id AND o.created_at = a.outbox_created_at AND o.tracking_id = a.tracking_id \
                  WHERE o.id IS NULL OR a.changed_at < o.created_at",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);

    // Off: the trigger goes, the history stays, nothing more is recorded.
    let log = migrate(&outbox, &["--no-audit"], &[]);
    assert!(log.contains("dropped the status audit trigger"), "{log}");
    assert!(!trigger_installed(&outbox).await);
    assert!(audit_table_exists(&outbox).await);
    insert_events(&outbox, 100).await;
    let relay = outbox.start_relay();
    wait_completed(&outbox, 400).await;
    assert!(relay.terminate().success());
    assert_eq!(audit_rows(&outbox).await, 300, "no recording while off");
}

#[tokio::test]
async fn poll_relay_records_pending_processing_completed_for_every_event() {
    let mut outbox = TestOutbox::new("audit_poll").await;
    outbox.extra_config = "[outbox]\nbatch_size = 50\n\n[poll]\nconcurrency = 2\n".into();
    // --audit together with --relay-role (the harness adds it).
    migrate(&outbox, &["--audit"], &[]);
    assert!(trigger_installed(&outbox).await);

    let ids = insert_events(&outbox, 300).await;
    let relay = poll_relay(&outbox, "r");
    wait_completed(&outbox, 300).await;
    assert!(relay.terminate().success());

    let audit = transitions(&outbox).await;
    assert_eq!(audit.len(), ids.len(), "one history per event");
    for id in &ids {
        let ts = &audit[id];
        assert_eq!(
            path(ts),
            ["PENDING>PROCESSING", "PROCESSING>COMPLETED"],
            "{id}: {ts:?}"
        );
        for t in ts {
            assert_eq!(t.2, RELAY_ROLE, "changed_by is the relay's role");
            // Attempts are counted at claim time.
            assert_eq!(t.3, 1, "{id}: {ts:?}");
        }
    }
}

#[tokio::test]
async fn a_dead_letter_and_its_redrive_are_recorded_with_who_made_each_change() {
    let mut outbox = TestOutbox::new("audit_dle").await;
    // Turned on from the config file this time.
    outbox.extra_config = "[outbox]\naudit = true\n".into();
    migrate(&outbox, &[], &[]);
    assert!(trigger_installed(&outbox).await);
    // The relay role writes audit rows only through the trigger.
    let table = format!("{}.outbox_status_audit", outbox.name);
    let can_write: bool = outbox
        .client
        .query_one(
            "SELECT has_table_privilege($1, $2, 'INSERT') OR has_table_privilege($1, $2, 'UPDATE') \
                 OR has_table_privilege($1, $2, 'DELETE')",
            &[&RELAY_ROLE, &table],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!can_write, "the relay role has no privilege on {table}");

    // Permanent failure (no valid topic name): dead-lettered at once.
    let poison: Uuid = outbox
        .client
        .query_one(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload) \
                 VALUES (gen_random_uuid(), 'bad type!', 'Happened', '{{}}') RETURNING tracking_id",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let relay = poll_relay(&outbox, "r");
    wait_for(
        "the event dead-lettered",
        Duration::from_secs(60),
        || async {
            let s = outbox.statuses().await;
            (s.get("DEAD_LETTER") == Some(&1)).then_some(())
        },
    )
    .await;
    assert!(relay.terminate().success());

    let out = outbox
        .command_with_args(&[
            "dle",
            "redrive",
            &poison.to_string(),
            "--reason",
            "aggregate type renamed by the producer",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let admin = admin_user(&outbox).await;
    let audit = transitions(&outbox).await;
    let ts = &audit[&poison];
    assert_eq!(
        path(ts),
        [
            "PENDING>PROCESSING",
            "PROCESSING>DEAD_LETTER",
            "DEAD_LETTER>PENDING"
        ],
        "{ts:?}"
    );
    assert_eq!(ts[0].2, RELAY_ROLE);
    assert_eq!(ts[1].2, RELAY_ROLE);
    assert!(
        ts[1].4.as_deref().unwrap_or_default().contains("topic"),
        "the dead letter's last_error: {ts:?}"
    );
    assert_eq!(ts[2].2, admin, "the redrive is the operator's");
    assert_eq!(ts[2].3, 0, "redrive resets retry_count");

    // A session acting as another role (SET ROLE) is recorded as that role;
    // an UPDATE that leaves the status as it is records nothing.
    outbox
        .client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ROLE {RELAY_ROLE}; \
             UPDATE {0}.outbox SET status = 'PENDING', last_error = 'touched'; \
             UPDATE {0}.outbox SET status = 'COMPLETED', processed_at = now(); COMMIT",
            outbox.name
        ))
        .await
        .unwrap();
    let audit = transitions(&outbox).await;
    let ts = &audit[&poison];
    assert_eq!(ts.len(), 4, "{ts:?}");
    assert_eq!(path(&ts[3..]), ["PENDING>COMPLETED"]);
    assert_eq!(ts[3].2, RELAY_ROLE);
}

#[test]
fn audit_flags_are_checked_before_connecting() {
    let run = |args: &[&str], table: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgoutbox"))
            .args(args)
            .env_clear()
            // Nothing listens there: a refusal must come before connecting.
            .env("DATABASE_URL", "postgres://nobody@127.0.0.1:9/none")
            .env("OUTBOX_TABLE", table)
            .output()
            .expect("run pgoutbox")
    };
    let out = run(&["migrate", "--audit", "--no-audit"], "outbox");
    assert_eq!(out.status.code(), Some(2), "conflicting flags");
    let long = "t".repeat(48);
    let out = run(&["migrate", "--audit"], &long);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("outbox.audit") && stderr.contains("at most 47"),
        "{stderr}"
    );
}

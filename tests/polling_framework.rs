//! Switching from the TypeScript polling framework pgoutbox grew from, on
//! its own tables, against the real services: each test creates the table
//! exactly as the framework does, writes rows in every status, adopts it
//! (`pgoutbox migrate` refuses, naming `adopt`), runs the relay and checks
//! with the ledger that every unfinished row is delivered once and nothing
//! else is sent.

mod common;

use std::process::Output;
use std::time::Duration;

use common::harness::{
    delivery_counts, read_topics, relay_password, wait_for, Record, Relay, TestOutbox, RELAY_ROLE,
};
use common::ledger::Load;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// The framework's columns, as its schema file declares them; `{key}` is
/// its primary key clause.
fn framework_columns(key: &str) -> String {
    format!(
        "id              BIGSERIAL,
         tracking_id     UUID NOT NULL,
         aggregate_id    UUID NOT NULL,
         aggregate_type  TEXT NOT NULL,
         event_type      TEXT NOT NULL,
         payload         JSONB NOT NULL,
         metadata        JSONB DEFAULT '{{}}',
         status          TEXT NOT NULL DEFAULT 'PENDING'
                         CHECK (status IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED', 'DEAD_LETTER')),
         retry_count     INT NOT NULL DEFAULT 0,
         max_retries     INT NOT NULL DEFAULT 5,
         created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
         processed_at    TIMESTAMPTZ,
         locked_until    TIMESTAMPTZ,
         lock_token      BIGINT,
         last_error      TEXT,
         {key}"
    )
}

/// Replaces the test's migrated `outbox` (and its publish function) with
/// the framework's own table (`ddl`, run in the test's schema).
async fn framework_table(outbox: &TestOutbox, ddl: &str) {
    let s = &outbox.name;
    outbox
        .client
        .batch_execute(&format!(
            "DROP TABLE {s}.outbox CASCADE;
             DROP FUNCTION {s}.outbox_publish(text, uuid, text, jsonb, jsonb);
             DELETE FROM public.pgoutbox_migrations WHERE target = '{s}.outbox';
             SET search_path = {s};
             {ddl};
             RESET search_path"
        ))
        .await
        .expect("create the framework's table");
}

/// One row per status the framework leaves, `n` of each; returns the
/// tracking ids of the rows a relay must deliver (PENDING, FAILED with
/// retries left, PROCESSING under an expired lease — also one whose
/// `retry_count` already reached `max_retries`: the framework counts at
/// failure, so its claim was not an attempt pgoutbox may count) and of those
/// it must not (COMPLETED, DEAD_LETTER).
async fn rows_in_every_status(outbox: &TestOutbox, n: usize) -> (Vec<Uuid>, Vec<Uuid>) {
    let s = &outbox.name;
    let (mut deliver, mut keep) = (Vec::new(), Vec::new());
    let aggregate = Uuid::new_v4();
    for i in 0..n {
        for (status, retries, lease) in [
            ("PENDING", 0, None),
            ("FAILED", 2, None),
            ("PROCESSING", 1, Some("now() - interval '1 minute'")),
            ("PROCESSING", 5, Some("now() - interval '1 minute'")),
            ("COMPLETED", 0, None),
            ("DEAD_LETTER", 5, None),
        ] {
            let id = Uuid::new_v4();
            let lease = lease.unwrap_or("NULL");
            outbox
                .client
                .execute(
                    &format!(
                        "INSERT INTO {s}.outbox (tracking_id, aggregate_id, aggregate_type, event_type, payload, \
                           status, retry_count, locked_until, lock_token) \
                         VALUES ($1, $2, 'Order', 'Created', jsonb_build_object('n', $3::int, 'status', $4::text), \
                           $4, $5, {lease}, CASE WHEN $4 = 'PROCESSING' THEN 42 END)"
                    ),
                    &[&id, &aggregate, &(i as i32), &status, &retries],
                )
                .await
                .expect("insert a framework row");
            if matches!(status, "COMPLETED" | "DEAD_LETTER") {
                keep.push(id);
            } else {
                deliver.push(id);
            }
        }
    }
    (deliver, keep)
}

/// Runs `pgoutbox <args>` as the admin role.
fn admin(outbox: &TestOutbox, args: &[&str]) -> Output {
    let mut cmd = outbox.admin_command();
    cmd.args(args);
    common::harness::output_checked(&mut cmd)
}

/// `pgoutbox adopt --relay-role …`, which must succeed.
fn adopt(outbox: &TestOutbox) -> String {
    let mut cmd = outbox.admin_command();
    cmd.arg("adopt")
        .args(["--relay-role", RELAY_ROLE])
        .env("PGOUTBOX_RELAY_PASSWORD", relay_password());
    let out = common::harness::output_checked(&mut cmd);
    assert!(
        out.status.success(),
        "adopt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start(outbox: &TestOutbox, mode: &str) -> Relay {
    let mut cmd = outbox.command();
    cmd.args(["run", "--mode", mode]);
    Relay::spawn(cmd, &format!("{}-{mode}", outbox.name))
}

/// Reads the Order topic until it holds `n` records (and a moment more,
/// through the reader's own quiet period, to catch any extra).
async fn read_orders(outbox: &TestOutbox, n: usize) -> Vec<Record> {
    let topic = outbox.topic("Order");
    tokio::task::spawn_blocking(move || read_topics(&[topic], DEADLINE, |r| r.len() >= n))
        .await
        .expect("reader")
}

/// Every id of `deliver` exactly once, none of `keep`, nothing else.
fn assert_ledger(records: &[Record], deliver: &[Uuid], keep: &[Uuid]) {
    let counts = delivery_counts(records);
    let missing: Vec<&Uuid> = deliver
        .iter()
        .filter(|id| !counts.contains_key(&id.to_string()))
        .collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let finished: Vec<&Uuid> = keep
        .iter()
        .filter(|id| counts.contains_key(&id.to_string()))
        .collect();
    assert!(
        missing.is_empty() && twice.is_empty() && finished.is_empty(),
        "missing {missing:?}, delivered twice {twice:?}, finished rows sent again {finished:?}"
    );
    assert_eq!(records.len(), deliver.len(), "nothing else was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_default_table_is_streamed_as_it_is() {
    default_table_switch("fw_plain_cdc", "cdc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_default_table_is_polled_as_it_is() {
    default_table_switch("fw_plain_poll", "poll").await;
}

/// The framework's default table (not partitioned, `id` the primary key,
/// `tracking_id` without a default) with rows in every status, adopted and
/// relayed in `mode`.
async fn default_table_switch(name: &str, mode: &str) {
    let outbox = TestOutbox::new(name).await;
    framework_table(
        &outbox,
        &format!(
            "CREATE TABLE outbox ({});
             CREATE INDEX idx_outbox_status_created ON outbox (status, created_at)",
            framework_columns("PRIMARY KEY (id)")
        ),
    )
    .await;
    let (mut deliver, keep) = rows_in_every_status(&outbox, 3).await;

    let out = admin(&outbox, &["migrate"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pgoutbox adopt"),
        "migrate leaves the framework's table alone and names adopt: {err}"
    );
    // What the framework leaves behind: its audit trigger and, from a CDC
    // experiment, a logical slot nobody reads.
    let legacy_slot = format!("{name}_legacy");
    outbox
        .client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{legacy_slot}';
             SELECT pg_create_logical_replication_slot('{legacy_slot}', 'pgoutput');
             CREATE FUNCTION {s}.outbox_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
             CREATE TRIGGER outbox_audit AFTER UPDATE ON {s}.outbox FOR EACH ROW EXECUTE FUNCTION {s}.outbox_audit_fn()",
            s = outbox.name
        ))
        .await
        .expect("the framework's leftovers");
    let report = adopt(&outbox);
    for feature in [
        "relaying: ok",
        "marking: ok",
        "poll mode: ok",
        &format!("leftover: replication slot {legacy_slot}: inactive logical slot"),
        &format!("To remove: SELECT pg_drop_replication_slot('{legacy_slot}');"),
        "leftover: trigger outbox_audit: runs outbox_audit_fn()",
        &format!(
            "To remove: DROP TRIGGER \"outbox_audit\" ON \"{}\".\"outbox\";",
            outbox.name
        ),
    ] {
        assert!(report.contains(feature), "{feature}: {report}");
    }
    let status = admin(&outbox, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && text.contains(&format!("leftover    replication slot {legacy_slot}"))
            && text.contains("leftover    trigger outbox_audit"),
        "status shows the leftovers: {text}"
    );
    outbox
        .client
        .batch_execute(&format!(
            "SELECT pg_drop_replication_slot('{legacy_slot}'); DROP TRIGGER outbox_audit ON {}.outbox",
            outbox.name
        ))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&admin(&outbox, &["status"]).stdout).into_owned();
    assert!(
        !text.contains(&legacy_slot) && !text.contains("outbox_audit"),
        "removed leftovers are gone: {text}"
    );

    // The publish function adopt makes fills tracking_id itself: the
    // framework's column has no default.
    let published: Uuid = outbox
        .client
        .query_one(
            &format!(
                "SELECT {}.outbox_publish('Order', gen_random_uuid(), 'Published', '{{\"via\": \"outbox_publish\"}}')",
                outbox.name
            ),
            &[],
        )
        .await
        .expect("outbox_publish on the framework's table")
        .get(0);
    deliver.push(published);

    let partitions = admin(&outbox, &["partitions", "maintain"]);
    let err = String::from_utf8_lossy(&partitions.stderr);
    assert!(
        !partitions.status.success() && err.contains("not partitioned"),
        "partition features say they need a partitioned table: {err}"
    );

    // A row pgoutbox's own worker claimed for its last attempt and died
    // holding (its token carries pgoutbox's tag): spent, dead-lettered by
    // the poll reaper; CDC's backfill delivers it.
    let spent = Uuid::new_v4();
    outbox
        .client
        .execute(
            &format!(
                "INSERT INTO {}.outbox (tracking_id, aggregate_id, aggregate_type, event_type, payload, \
                   status, retry_count, locked_until, lock_token) \
                 VALUES ($1, gen_random_uuid(), 'Order', 'Created', '{{}}', 'PROCESSING', 5, \
                   now() - interval '1 minute', (x'7067' :: bigint << 48) | 7)",
                outbox.name
            ),
            &[&spent],
        )
        .await
        .unwrap();
    let (mut keep, dead) = (keep, if mode == "poll" { 4 } else { 3 });
    if mode == "poll" {
        keep.push(spent);
    } else {
        deliver.push(spent);
    }

    let relay = start(&outbox, mode);
    wait_for("every unfinished row settled", DEADLINE, || async {
        let s = outbox.statuses().await;
        let n = |status: &str| s.get(status).copied().unwrap_or(0);
        (n("COMPLETED") == 3 + deliver.len() as i64 && n("DEAD_LETTER") == dead).then_some(())
    })
    .await;
    let log = relay.log_text();
    relay.terminate();
    assert!(
        !log.contains("could not ensure outbox partitions"),
        "nothing to create ahead on a table that is not partitioned:\n{log}"
    );
    let records = read_orders(&outbox, deliver.len()).await;
    assert_ledger(&records, &deliver, &keep);
    let statuses = outbox.statuses().await;
    assert_eq!(
        statuses.get("DEAD_LETTER").copied().unwrap_or(0),
        dead,
        "dead letters stay dead letters (poll: and the spent pgoutbox claim joins them): {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_table_less_events_are_relayed_by_prefix_pattern_and_strays_are_reported() {
    let mut outbox = TestOutbox::new("fw_msgs").await;
    outbox
        .env
        .push(("OUTBOX_MESSAGE_PREFIXES".into(), "outbox.*".into()));
    let relay = start(&outbox, "cdc");
    let slot = outbox.slot();
    let sql = format!(
        "SELECT count(*) FROM {}.pgoutbox_slot_state WHERE slot_name = $1 AND backfill_done_at IS NOT NULL",
        outbox.name
    );
    wait_for("the relay's slot and first backfill", DEADLINE, || async {
        let done: i64 = outbox.client.query_one(&sql, &[&slot]).await.ok()?.get(0);
        (done == 1).then_some(())
    })
    .await;

    // As the framework emits them: one transactional message per event,
    // prefix outbox.<AggregateType>.<EventType>, its JSON envelope.
    let aggregate = Uuid::new_v4();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let tx = outbox.client.transaction().await.unwrap();
    for (n, id) in ids.iter().enumerate() {
        let content = serde_json::json!({
            "tracking_id": id, "aggregate_id": aggregate, "aggregate_type": "Invoice",
            "event_type": "Paid", "payload": {"n": n},
            "metadata": {"emitted_at": "2026-12-03T10:00:00Z", "schema_version": 1},
        });
        tx.execute(
            "SELECT pg_logical_emit_message(true, 'outbox.Invoice.Paid', $1::text)",
            &[&content.to_string()],
        )
        .await
        .unwrap();
    }
    tx.execute(
        "SELECT pg_logical_emit_message(true, 'outbox_legacy', '{}')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let topic = outbox.topic("Invoice");
    let records =
        tokio::task::spawn_blocking(move || read_topics(&[topic], DEADLINE, |r| r.len() >= 3))
            .await
            .expect("reader");
    let got: Vec<String> = records
        .iter()
        .map(|r| r.header("tracking_id").to_owned())
        .collect();
    let want: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(got, want, "each event once, in order");
    assert_eq!(records[0].key, aggregate.to_string());
    assert_eq!(records[2].value, r#"{"n":2}"#);
    // Its metadata keys are headers of their own.
    assert_eq!(records[0].header("emitted_at"), "2026-12-03T10:00:00Z");
    assert_eq!(records[0].header("schema_version"), "1");
    let log = wait_for("the stray prefix reported", DEADLINE, || async {
        let log = relay.log_text();
        (log.contains("not relaying logical messages with this prefix")
            && log.contains("outbox_legacy"))
        .then_some(log)
    })
    .await;
    relay.terminate();
    assert!(
        !log.contains("prefix=outbox.Invoice.Paid"),
        "the pattern's messages are not reported: {log}"
    );
}

/// A stand-in for the framework's worker on its own connection: claims as
/// it does (`FOR UPDATE SKIP LOCKED`, a lease, its own lock token), renews
/// the lease while it holds rows (its heartbeat), and either completes them
/// (a clean stop: it delivered them itself) or vanishes (SIGKILL: its
/// leases run out).
struct FrameworkWorker {
    client: std::sync::Arc<tokio_postgres::Client>,
    table: String,
    token: i64,
    heartbeat: tokio::task::JoinHandle<()>,
    held: Vec<Uuid>,
}

impl FrameworkWorker {
    const LEASE_SECONDS: f64 = 3.0;

    async fn claim(outbox: &TestOutbox, n: i64) -> FrameworkWorker {
        let client = std::sync::Arc::new(common::harness::connect().await);
        let table = format!("{}.outbox", outbox.name);
        let token: i64 = 4242;
        let held: Vec<Uuid> = client
            .query(
                &format!(
                    "UPDATE {table} SET status = 'PROCESSING', locked_until = now() + make_interval(secs => $1), \
                       lock_token = $2 \
                     WHERE id IN (SELECT id FROM {table} WHERE status IN ('PENDING', 'FAILED') \
                                    AND (locked_until IS NULL OR locked_until < now()) \
                                  ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
                     RETURNING tracking_id"
                ),
                &[&Self::LEASE_SECONDS, &token, &n],
            )
            .await
            .expect("the framework's claim")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let beat = client.clone();
        let sql = format!(
            "UPDATE {table} SET locked_until = now() + make_interval(secs => $1) \
              WHERE lock_token = $2 AND status = 'PROCESSING'"
        );
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = beat.execute(&sql, &[&Self::LEASE_SECONDS, &token]).await;
            }
        });
        FrameworkWorker {
            client,
            table,
            token,
            heartbeat,
            held,
        }
    }

    /// A clean stop: it completes what it holds (it delivered those).
    async fn stop(self) -> Vec<Uuid> {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        self.client
            .execute(
                &format!(
                    "UPDATE {} SET status = 'COMPLETED', processed_at = now(), locked_until = NULL, \
                       lock_token = NULL WHERE lock_token = $1 AND status = 'PROCESSING'",
                    self.table
                ),
                &[&self.token],
            )
            .await
            .expect("the framework completes its rows");
        self.held
    }

    /// SIGKILL: no completion, no heartbeat; its leases run out.
    async fn kill(self) -> Vec<Uuid> {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        self.held
    }
}

/// The framework's default table with `n` PENDING rows, adopted.
async fn framework_outbox(name: &str, n: usize) -> (TestOutbox, Vec<Uuid>) {
    let mut outbox = TestOutbox::new(name).await;
    framework_table(
        &outbox,
        &format!(
            "CREATE TABLE outbox ({})",
            framework_columns("PRIMARY KEY (id)")
        ),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = Uuid::new_v4();
        outbox
            .client
            .execute(
                &format!(
                    "INSERT INTO {}.outbox (tracking_id, aggregate_id, aggregate_type, event_type, payload) \
                     VALUES ($1, gen_random_uuid(), 'Order', 'Created', jsonb_build_object('n', $2::int))",
                    outbox.name
                ),
                &[&id, &(i as i32)],
            )
            .await
            .unwrap();
        ids.push(id);
    }
    adopt(&outbox);
    // pgoutbox's own leases and reaper, short, so that a test waits
    // seconds for an expiry.
    outbox.env.push(("OUTBOX_LEASE_SECONDS".into(), "2".into()));
    // Samples (and the sampler's check for other pollers) every second.
    outbox.extra_config = "[metrics]\nsample_interval_s = 1\n".into();
    (outbox, ids)
}

/// The live handover, in `mode`, with the framework's worker stopped
/// cleanly or killed: while it holds rows under a live lease pgoutbox does
/// not send them (CDC: does not even create its slot) and says so; once it
/// is gone every row it did not complete is delivered, once.
async fn live_handover(name: &str, mode: &str, killed: bool) {
    let (outbox, ids) = framework_outbox(name, 20).await;
    let worker = FrameworkWorker::claim(&outbox, 5).await;
    assert_eq!(worker.held.len(), 5);
    let relay = start(&outbox, mode);
    wait_for(
        "pgoutbox to report the other poller's leases",
        DEADLINE,
        || async {
            relay
                .log_text()
                .contains("rows are held under live leases by another poller")
                .then_some(())
        },
    )
    .await;
    let count = |status: &'static str| {
        let sql = format!(
            "SELECT count(*) FROM {}.outbox WHERE status = $1",
            outbox.name
        );
        let client = &outbox.client;
        async move {
            client
                .query_one(&sql, &[&status])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    if mode == "cdc" {
        let slots: i64 = outbox
            .client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&outbox.slot()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0, "no slot while another poller holds rows");
    } else {
        wait_for(
            "poll mode to deliver the rows nobody holds",
            DEADLINE,
            || async { (count("COMPLETED").await == 15).then_some(()) },
        )
        .await;
        assert_eq!(
            count("PROCESSING").await,
            5,
            "the held rows stay the worker's"
        );
    }
    let (deliver, keep): (Vec<Uuid>, Vec<Uuid>) = if killed {
        worker.kill().await;
        (ids, Vec::new())
    } else {
        let done = worker.stop().await;
        ids.into_iter().partition(|id| !done.contains(id))
    };
    wait_for("every row COMPLETED", DEADLINE, || async {
        (count("COMPLETED").await == 20).then_some(())
    })
    .await;
    if mode == "cdc" && !killed {
        // The framework's worker started again after the switch: it takes
        // a row CDC does not stream (FAILED), and the relay says so.
        outbox
            .client
            .execute(
                &format!(
                    "INSERT INTO {}.outbox (tracking_id, aggregate_id, aggregate_type, event_type, payload, status) \
                     VALUES (gen_random_uuid(), gen_random_uuid(), 'Other', 'Created', '{{}}', 'FAILED')",
                    outbox.name
                ),
                &[],
            )
            .await
            .unwrap();
        let again = FrameworkWorker::claim(&outbox, 1).await;
        assert_eq!(again.held.len(), 1);
        wait_for(
            "the relay to report the poller running again",
            DEADLINE,
            || async {
                relay
                    .log_text()
                    .contains("held under live leases by another poller while CDC streams")
                    .then_some(())
            },
        )
        .await;
        again.stop().await;
    }
    relay.terminate();
    let records = read_orders(&outbox, deliver.len()).await;
    assert_ledger(&records, &deliver, &keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdc_waits_for_the_frameworks_live_leases_and_takes_over_after_a_clean_stop() {
    live_handover("fw_live_cdc", "cdc", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cdc_delivers_what_a_killed_framework_worker_held_once_its_leases_end() {
    live_handover("fw_kill_cdc", "cdc", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_leaves_the_frameworks_live_leases_alone_and_takes_over_after_a_kill() {
    live_handover("fw_kill_poll", "poll", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_partitioned_table_keeps_its_own_partitions_and_gets_indexes_concurrently() {
    let outbox = TestOutbox::new("fw_parts").await;
    let s = outbox.name.clone();
    // The "Day 0" variant, partitions made as its README shows, by date
    // literals in the session's time zone (not UTC): they start at 03:00Z.
    framework_table(
        &outbox,
        &format!(
            "CREATE TABLE outbox ({}) PARTITION BY RANGE (created_at);
             SET TIME ZONE 'America/Sao_Paulo';
             DO $$ DECLARE m date := date_trunc('month', now())::date; BEGIN
               FOR i IN 0..1 LOOP
                 EXECUTE format('CREATE TABLE outbox_%s PARTITION OF outbox FOR VALUES FROM (%L) TO (%L)',
                   to_char(m + make_interval(months => i), 'YYYY_MM'),
                   (m + make_interval(months => i))::date, (m + make_interval(months => i + 1))::date);
               END LOOP;
             END $$;
             RESET TIME ZONE",
            framework_columns("PRIMARY KEY (id, created_at)")
        ),
    )
    .await;
    let (deliver, keep) = rows_in_every_status(&outbox, 3).await;
    let report = adopt(&outbox);
    assert!(
        report.contains("built outbox_pending_idx") && report.contains("concurrently"),
        "{report}"
    );
    let valid: i64 = outbox
        .client
        .query_one(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
              WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND c.relname LIKE '%\\_idx'",
            &[&format!("{s}.outbox")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        valid, 4,
        "four status indexes, valid on the parent once every partition's is attached"
    );
    let before = partition_names(&outbox).await;
    assert_eq!(before.len(), 2);
    foreign_partitions_left_alone(
        &outbox,
        &before,
        ("outside pgoutbox", "partitioned outside pgoutbox"),
        &deliver,
        &keep,
    )
    .await;
}

/// Point 1's path to the partition lifecycle: the framework's default
/// table, adopted and streamed by a CDC relay, converted to a partitioned
/// table while the application inserts — every committed event delivered
/// once, in per-aggregate order, inserts never stopping, and the new
/// partitions pgoutbox's (created ahead, relayed through the parent).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_default_table_is_converted_to_partitioned_online_under_load() {
    let outbox = TestOutbox::new("fw_convert").await;
    let s = outbox.name.clone();
    framework_table(
        &outbox,
        &format!(
            "CREATE TABLE outbox ({});
             CREATE INDEX idx_outbox_status_created ON outbox (status, created_at)",
            framework_columns("PRIMARY KEY (id)")
        ),
    )
    .await;
    // What must carry over: a grant and a row trigger (its log proves it
    // fires on the new partitions too).
    outbox
        .client
        .batch_execute(&format!(
            "CREATE TABLE {s}.audit_log (tracking_id uuid);
             CREATE FUNCTION {s}.outbox_audit_fn() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO {s}.audit_log VALUES (NEW.tracking_id); RETURN NEW; END $$;
             CREATE TRIGGER outbox_audit AFTER UPDATE ON {s}.outbox FOR EACH ROW EXECUTE FUNCTION {s}.outbox_audit_fn();
             GRANT SELECT ON {s}.outbox TO PUBLIC;
             GRANT INSERT ON {s}.audit_log TO PUBLIC"
        ))
        .await
        .unwrap();
    let refused = admin(&outbox, &["partitions", "convert"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("pgoutbox adopt"),
        "an unadopted table is refused, naming adopt: {err}"
    );
    adopt(&outbox);
    let dry = admin(&outbox, &["partitions", "convert", "--dry-run"]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success()
            && text.contains("ATTACH PARTITION")
            && text.contains("FROM (MINVALUE)"),
        "the dry run prints the swap: {text}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(relkind(&outbox).await, "r", "a dry run changes nothing");

    let relay = start(&outbox, "cdc");
    let slot = outbox.slot();
    let sql = format!(
        "SELECT count(*) FROM {s}.pgoutbox_slot_state WHERE slot_name = $1 AND backfill_done_at IS NOT NULL"
    );
    wait_for("the relay's slot and first backfill", DEADLINE, || async {
        let done: i64 = outbox.client.query_one(&sql, &[&slot]).await.ok()?.get(0);
        (done == 1).then_some(())
    })
    .await;
    let load = Load::start(&s, "Order", 20, Duration::from_millis(2));
    wait_for("inserts flowing", DEADLINE, || async {
        (load.committed() >= 200).then_some(())
    })
    .await;
    let before = load.committed();
    let out = admin(&outbox, &["partitions", "convert"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success()
            && report.contains("is partitioned")
            && report.contains("swapped in one transaction"),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{report}");
    let during = load.committed();
    wait_for("inserts flowing after the swap", DEADLINE, || async {
        (load.committed() >= during + 200).then_some(())
    })
    .await;
    let written = load.stop().await;
    assert!(
        during > before,
        "inserts went on while the table was converted ({before} → {during})"
    );

    // The catalog: partitioned, the old table first (MINVALUE up to the
    // bound), pgoutbox's partitions after it, the key with created_at, the
    // publication on the parent.
    assert_eq!(relkind(&outbox).await, "p");
    let parts: Vec<(String, String)> = outbox
        .client
        .query(
            &format!(
                "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i \
                   JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '{s}.outbox'::regclass ORDER BY 1"
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        parts
            .iter()
            .any(|(n, b)| n == "outbox_legacy" && b.contains("MINVALUE"))
            && parts
                .iter()
                .filter(|(n, _)| n.starts_with("outbox_2"))
                .count()
                >= 2,
        "{parts:?}"
    );
    let key: String = outbox
        .client
        .query_one(
            &format!(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = '{s}.outbox'::regclass AND contype = 'p'"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "PRIMARY KEY (id, created_at)");
    let published: i64 = outbox
        .client
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE schemaname = $1 AND tablename = 'outbox'",
            &[&s],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 1, "the publication covers the parent");

    // A row of the next period lands in one of pgoutbox's partitions and is
    // relayed through the parent; the trigger fires on its mark.
    let later = Uuid::new_v4();
    outbox
        .client
        .execute(
            &format!(
                "INSERT INTO {s}.outbox (tracking_id, aggregate_id, aggregate_type, event_type, payload, created_at) \
                 SELECT $1, gen_random_uuid(), 'Order', 'Later', '{{}}', upper(r) + interval '1 hour' \
                   FROM (SELECT tstzrange(NULL, (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \\(''([^'']+)''\\)'))[1]::timestamptz) AS r \
                           FROM pg_class c WHERE c.oid = '{s}.outbox_legacy'::regclass) b"
            ),
            &[&later],
        )
        .await
        .expect("a row after the bound");
    let mut expected: Vec<Uuid> = written.committed.iter().map(|w| w.tracking_id).collect();
    expected.push(later);
    let topic = outbox.topic("Order");
    let n = expected.len();
    let records =
        tokio::task::spawn_blocking(move || read_topics(&[topic], DEADLINE, |r| r.len() >= n))
            .await
            .expect("reader");
    let counts = delivery_counts(&records);
    let missing: Vec<&Uuid> = expected
        .iter()
        .filter(|id| !counts.contains_key(&id.to_string()))
        .collect();
    assert!(missing.is_empty(), "{} missing: {missing:?}", missing.len());
    let twice = counts.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "nothing sent twice: the relay streamed through");
    assert_eq!(common::ledger::reorders(&records), 0, "per-aggregate order");
    assert!(
        written
            .rolled_back
            .iter()
            .all(|id| !counts.contains_key(&id.to_string())),
        "nothing of a rolled-back transaction"
    );
    wait_for("the later row marked and audited", DEADLINE, || async {
        let audited: i64 = outbox
            .client
            .query_one(
                &format!("SELECT count(*) FROM {s}.audit_log WHERE tracking_id = $1"),
                &[&later],
            )
            .await
            .ok()?
            .get(0);
        (audited == 1).then_some(())
    })
    .await;
    // Issue 18, point 10 on the adopted, converted table: the later event
    // replayed (it lies after the replay's start, hence --to).
    let out = admin(
        &outbox,
        &[
            "replay",
            "--event-type",
            "Later",
            "--to",
            "2100-01-01",
            "--reason",
            "test: replay from a converted table",
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let topic = outbox.topic("Order");
    let later_text = later.to_string();
    let records = tokio::task::spawn_blocking(move || {
        read_topics(&[topic], DEADLINE, |r| {
            r.iter()
                .filter(|r| r.header("tracking_id") == later_text)
                .count()
                >= 2
        })
    })
    .await
    .expect("reader");
    let copies: Vec<&Record> = records
        .iter()
        .filter(|r| r.header("tracking_id") == later.to_string())
        .collect();
    assert_eq!(copies.len(), 2, "the later event and its replay");
    assert!(
        copies[0].header("pgoutbox_replay").is_empty()
            && !copies[1].header("pgoutbox_replay").is_empty(),
        "the replay carries the pgoutbox_replay header"
    );
    let status = String::from_utf8_lossy(&admin(&outbox, &["status"]).stdout).into_owned();
    assert!(
        status.contains("created ahead by pgoutbox"),
        "the relay creates this table's partitions now: {status}"
    );
    let maintain = admin(&outbox, &["partitions", "maintain", "--dry-run"]);
    assert!(
        maintain.status.success(),
        "partitions maintain serves the converted table: {}",
        String::from_utf8_lossy(&maintain.stderr)
    );
    let log = relay.log_text();
    relay.terminate();
    assert!(
        !log.contains("could not ensure outbox partitions"),
        "the relay's create-ahead works on the converted table:\n{log}"
    );
}

/// `relkind` of the test's outbox table.
async fn relkind(outbox: &TestOutbox) -> String {
    outbox
        .client
        .query_one(
            &format!(
                "SELECT relkind::text FROM pg_class WHERE oid = '{}.outbox'::regclass",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Point 2 with the real pg_partman (Debian's postgresql-15-partman, which
/// scripts/install-deps installs beside PostgreSQL 15): the framework's
/// partitioned table under pg_partman's daily partitions (`outbox_pYYYY_MM_DD`
/// and a default partition) is adopted and relayed, pgoutbox never creates
/// a partition beside them, and status and maintain name pg_partman.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_frameworks_pg_partman_table_keeps_pg_partmans_daily_partitions() {
    let outbox = TestOutbox::new("fw_partman").await;
    let s = outbox.name.clone();
    let row = outbox
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_partman'), \
                    current_setting('server_version_num')::int / 10000",
            &[],
        )
        .await
        .unwrap();
    let (available, major): (bool, i32) = (row.get(0), row.get(1));
    if !available {
        assert!(
            major != 15 || std::env::var_os("CI").is_none(),
            "pg_partman is missing from Debian's PostgreSQL 15: scripts/install-deps installs postgresql-15-partman"
        );
        eprintln!(
            "SKIPPED: pg_partman is not installed for PostgreSQL {major} here (Debian packages it for 15, which CI runs this test on)"
        );
        return;
    }
    outbox
        .client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS partman; CREATE EXTENSION IF NOT EXISTS pg_partman SCHEMA partman",
        )
        .await
        .expect("create pg_partman");
    framework_table(
        &outbox,
        &format!(
            "CREATE TABLE outbox ({}) PARTITION BY RANGE (created_at)",
            framework_columns("PRIMARY KEY (id, created_at)")
        ),
    )
    .await;
    // An earlier run's configuration outlives its schema.
    outbox
        .client
        .execute(
            "DELETE FROM partman.part_config WHERE parent_table = $1",
            &[&format!("{s}.outbox")],
        )
        .await
        .unwrap();
    outbox
        .client
        .execute(
            "SELECT partman.create_parent($1, 'created_at', 'native', 'daily')",
            &[&format!("{s}.outbox")],
        )
        .await
        .expect("pg_partman's create_parent");
    let made_by_partman = partition_names(&outbox).await;
    assert!(
        made_by_partman.iter().any(|n| n.starts_with("outbox_p")),
        "pg_partman's daily partitions: {made_by_partman:?}"
    );
    let (deliver, keep) = rows_in_every_status(&outbox, 3).await;
    let migrate = admin(&outbox, &["migrate"]);
    assert!(
        !migrate.status.success()
            && String::from_utf8_lossy(&migrate.stderr).contains("pgoutbox adopt"),
        "migrate leaves the table alone"
    );
    adopt(&outbox);
    foreign_partitions_left_alone(
        &outbox,
        &made_by_partman,
        ("pg_partman", "pg_partman"),
        &deliver,
        &keep,
    )
    .await;
}

/// The partitions of the test's outbox, by name.
async fn partition_names(outbox: &TestOutbox) -> Vec<String> {
    outbox
        .client
        .query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = to_regclass($1) ORDER BY 1",
            &[&format!("{}.outbox", outbox.name)],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// An adopted table whose partitions someone else makes (`who`: status's
/// name for them, and what maintain's refusal says): status and maintain
/// say so, a CDC relay delivers every row of `deliver` once and none of
/// `keep`, and no partition is added beside `partitions`.
async fn foreign_partitions_left_alone(
    outbox: &TestOutbox,
    partitions: &[String],
    who: (&str, &str),
    deliver: &[Uuid],
    keep: &[Uuid],
) {
    let status = String::from_utf8_lossy(&admin(outbox, &["status"]).stdout).into_owned();
    assert!(
        status.contains(&format!(
            "created by {}; the relay leaves them to it",
            who.0
        )),
        "{status}"
    );
    let maintain = admin(outbox, &["partitions", "maintain"]);
    let err = String::from_utf8_lossy(&maintain.stderr);
    assert!(!maintain.status.success() && err.contains(who.1), "{err}");
    let relay = start(outbox, "cdc");
    wait_for("every unfinished row settled", DEADLINE, || async {
        let n = outbox
            .statuses()
            .await
            .get("COMPLETED")
            .copied()
            .unwrap_or(0);
        (n == 3 + deliver.len() as i64).then_some(())
    })
    .await;
    let log = relay.log_text();
    relay.terminate();
    assert!(
        !log.contains("could not ensure outbox partitions") && !log.contains("overlap"),
        "the relay leaves their partitions alone:\n{log}"
    );
    assert_eq!(
        partition_names(outbox).await,
        partitions,
        "no partition of pgoutbox's beside them"
    );
    let records = read_orders(outbox, deliver.len()).await;
    assert_ledger(&records, deliver, keep);
}

//! Partition lifecycle against the real PostgreSQL, through the binary:
//! `pgoutbox partitions maintain` with a fake clock (`--now`) creates
//! partitions ahead (monthly and daily, never overlapping) and retires old
//! ones only when every row in them is done, archiving them when asked; the
//! relay creates partitions ahead as its least-privilege role.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::harness::{self, output_checked, wait_for, TestOutbox, RELAY_ROLE};
use serde_json::Value;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(120);

/// A test outbox whose client reads timestamps in UTC.
async fn outbox(name: &str) -> TestOutbox {
    let outbox = TestOutbox::new(name).await;
    outbox
        .client
        .batch_execute("SET TimeZone = 'UTC'")
        .await
        .unwrap();
    outbox
}

/// Runs `pgoutbox partitions maintain --json --now <now> <args>` as the
/// admin with `config` as the config file; returns the output and the
/// report.
fn maintain(outbox: &mut TestOutbox, config: &str, now: &str, args: &[&str]) -> (Output, Value) {
    outbox.extra_config = config.to_owned();
    let mut cmd = outbox.admin_command();
    cmd.args(["partitions", "maintain", "--json", "--now", now])
        .args(args);
    let out = output_checked(&mut cmd);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "maintain printed no JSON report ({e}):\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "maintain failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Partition name -> its bound as PostgreSQL prints it (UTC).
async fn partitions(outbox: &TestOutbox) -> BTreeMap<String, String> {
    outbox
        .client
        .query(
            "SELECT c.relname::text, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i \
               JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::text::regclass",
            &[&format!("{}.outbox", outbox.name)],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn bound(from: &str, to: &str) -> String {
    format!("FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')")
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Inserts `n` rows in `status`, created from `at` on (one second apart,
/// the first at `at`);
/// returns their tracking ids.
async fn insert(outbox: &TestOutbox, at: &str, status: &str, n: i64) -> Vec<Uuid> {
    outbox
        .client
        .query(
            &format!(
                "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, metadata, \
                   status, created_at, processed_at, locked_until, last_error) \
                 SELECT gen_random_uuid(), 'Order', 'OrderCreated', \
                        jsonb_build_object('n', g, 'note', E'two\\nlines, \"quotes\" and \\\\ a backslash'), \
                        '{{\"traceparent\": \"00-abc-01\"}}', $2, \
                        $1::text::timestamptz + make_interval(secs => g - 1), \
                        CASE WHEN $2 IN ('COMPLETED', 'DEAD_LETTER') THEN now() END, \
                        CASE WHEN $2 = 'PROCESSING' THEN now() + interval '1 hour' END, \
                        CASE WHEN $2 = 'DEAD_LETTER' THEN 'broker: message too large' END \
                   FROM generate_series(1, $3::bigint) g RETURNING tracking_id",
                outbox.name
            ),
            &[&at, &status, &n],
        )
        .await
        .expect("insert outbox rows")
        .into_iter()
        .map(|r| r.get(0))
        .collect()
}

/// Rows in the partition named `name` (0 when it no longer exists).
async fn rows_in(outbox: &TestOutbox, name: &str) -> i64 {
    let exists: bool = outbox
        .client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.{name}", outbox.name)],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return 0;
    }
    outbox
        .client
        .query_one(&format!("SELECT count(*) FROM {}.{name}", outbox.name), &[])
        .await
        .unwrap()
        .get(0)
}

fn kept_reason<'a>(report: &'a Value, partition: &str) -> &'a str {
    report["kept"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"].as_str().unwrap().ends_with(partition))
        .unwrap_or_else(|| panic!("{partition} is not among the kept: {report:#}"))["reason"]
        .as_str()
        .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every line of a gzip JSON-lines archive.
fn read_archive(path: &Path) -> Vec<Value> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read archive line")).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_creates_monthly_then_daily_partitions_ahead_without_overlapping() {
    let mut outbox = outbox("part_ahead").await;
    let before = partitions(&outbox).await;
    let monthly = "[partitions]\ninterval = \"monthly\"\nahead = 2\n";

    // A fake clock in January 2020: this month and two ahead.
    let (out, report) = maintain(&mut outbox, monthly, "2020-01-15T10:00:00Z", &[]);
    ok(&out);
    assert_eq!(report["now"], "2020-01-15T10:00:00Z");
    assert_eq!(
        names(&report["created"]),
        ["outbox_2020_01", "outbox_2020_02", "outbox_2020_03"]
    );
    let now = partitions(&outbox).await;
    assert_eq!(now["outbox_2020_01"], bound("2020-01-01", "2020-02-01"));
    assert_eq!(now["outbox_2020_03"], bound("2020-03-01", "2020-04-01"));
    assert_eq!(now.len(), before.len() + 3, "the real partitions stay");
    // Idempotent.
    let (out, report) = maintain(&mut outbox, monthly, "2020-01-20T00:00:00Z", &[]);
    ok(&out);
    assert_eq!(names(&report["created"]), Vec::<String>::new());

    // Switching to daily two days before the last monthly range ends: the
    // days it covers are skipped, daily partitions start after it.
    let daily = "[partitions]\ninterval = \"daily\"\nahead = 3\n";
    let (out, report) = maintain(&mut outbox, daily, "2020-03-30T08:00:00Z", &[]);
    ok(&out);
    assert_eq!(
        names(&report["created"]),
        ["outbox_2020_04_01", "outbox_2020_04_02"]
    );
    let now = partitions(&outbox).await;
    assert_eq!(now["outbox_2020_04_01"], bound("2020-04-01", "2020-04-02"));
    assert_eq!(now["outbox_2020_04_02"], bound("2020-04-02", "2020-04-03"));
    // A day later: one more.
    let (_, report) = maintain(&mut outbox, daily, "2020-03-31T08:00:00Z", &[]);
    assert_eq!(names(&report["created"]), ["outbox_2020_04_03"]);

    // And back to monthly: April is created from the end of the last daily
    // range, then May whole.
    let (out, report) = maintain(
        &mut outbox,
        "[partitions]\ninterval = \"monthly\"\nahead = 1\n",
        "2020-04-01T12:00:00Z",
        &[],
    );
    ok(&out);
    assert_eq!(
        names(&report["created"]),
        ["outbox_2020_04_04", "outbox_2020_05"]
    );
    let now = partitions(&outbox).await;
    assert_eq!(now["outbox_2020_04_04"], bound("2020-04-04", "2020-05-01"));
    assert_eq!(now["outbox_2020_05"], bound("2020-05-01", "2020-06-01"));

    // No gap and no overlap from January to June: every instant has exactly
    // one partition (PostgreSQL refuses overlaps; an insert finds the gaps).
    for at in [
        "2020-01-01 00:00:00",
        "2020-03-31 23:59:59.999999",
        "2020-04-01 00:00:00",
        "2020-04-03 23:59:59",
        "2020-04-04 00:00:00",
        "2020-05-31 23:59:59",
    ] {
        insert(&outbox, &format!("{at}+00"), "COMPLETED", 1).await;
    }
    let covered: i64 = outbox
        .client
        .query_one(&format!("SELECT count(*) FROM {}.outbox", outbox.name), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(covered, 6);

    // A dry run reports and changes nothing.
    let before = partitions(&outbox).await;
    let (out, report) = maintain(&mut outbox, daily, "2020-06-10T00:00:00Z", &["--dry-run"]);
    ok(&out);
    assert_eq!(report["dry_run"], true);
    assert_eq!(
        names(&report["created"]),
        [
            "outbox_2020_06_10",
            "outbox_2020_06_11",
            "outbox_2020_06_12",
            "outbox_2020_06_13"
        ]
    );
    assert_eq!(partitions(&outbox).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_partitions_whose_rows_are_all_done_are_dropped() {
    let mut outbox = outbox("part_retain").await;
    let layout = "[partitions]\nahead = 5\n";
    ok(&maintain(&mut outbox, layout, "2020-01-15T00:00:00Z", &[]).0);
    let jan = insert(&outbox, "2020-01-03", "COMPLETED", 3).await;
    insert(&outbox, "2020-02-03", "COMPLETED", 2).await;
    let feb_pending = insert(&outbox, "2020-02-04", "PENDING", 1).await;
    insert(&outbox, "2020-03-03", "COMPLETED", 1).await;
    insert(&outbox, "2020-03-04", "PROCESSING", 1).await;
    insert(&outbox, "2020-04-04", "FAILED", 1).await;
    insert(&outbox, "2020-05-03", "COMPLETED", 1).await;
    insert(&outbox, "2020-05-04", "DEAD_LETTER", 1).await;
    assert_eq!(jan.len(), 3);

    // 30 days before 2020-07-15: January to May are old enough, June is not.
    let retain = "[partitions]\nahead = 1\nretain = \"30d\"\n";
    let (out, report) = maintain(&mut outbox, retain, "2020-07-15T00:00:00Z", &[]);
    ok(&out);
    assert_eq!(report["cutoff"], "2020-06-15T00:00:00Z");
    let retired = names(&report["retired"]);
    assert_eq!(retired, [format!("{}.outbox_2020_01", outbox.name)]);
    assert_eq!(report["retired"][0]["archive"], Value::Null);
    assert!(kept_reason(&report, "outbox_2020_02").contains("1 PENDING"));
    assert!(kept_reason(&report, "outbox_2020_03").contains("1 PROCESSING"));
    assert!(kept_reason(&report, "outbox_2020_04").contains("1 FAILED"));
    assert!(kept_reason(&report, "outbox_2020_05").contains("DEAD_LETTER"));
    let now = partitions(&outbox).await;
    assert!(!now.contains_key("outbox_2020_01"), "{now:?}");
    assert!(now.contains_key("outbox_2020_06"), "too young: {now:?}");
    // Nothing else lost a row.
    for (name, rows) in [
        ("outbox_2020_02", 3),
        ("outbox_2020_03", 2),
        ("outbox_2020_04", 1),
        ("outbox_2020_05", 2),
    ] {
        assert_eq!(rows_in(&outbox, name).await, rows, "{name}");
    }

    // Once February's last row is delivered, February goes too.
    outbox
        .client
        .execute(
            &format!(
                "UPDATE {}.outbox SET status = 'COMPLETED', processed_at = now() WHERE tracking_id = $1",
                outbox.name
            ),
            &[&feb_pending[0]],
        )
        .await
        .unwrap();
    let (out, report) = maintain(&mut outbox, retain, "2020-07-15T00:00:00Z", &[]);
    ok(&out);
    assert_eq!(
        names(&report["retired"]),
        [format!("{}.outbox_2020_02", outbox.name)]
    );
    assert_eq!(rows_in(&outbox, "outbox_2020_03").await, 2);
    // The text form says the same.
    outbox.extra_config = retain.to_owned();
    let out = output_checked(outbox.admin_command().args([
        "partitions",
        "maintain",
        "--now",
        "2020-07-15T00:00:00Z",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("retention 30d"), "{text}");
    assert!(
        text.contains("kept") && text.contains("outbox_2020_03") && text.contains("PROCESSING"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_partition_holds_every_row_and_dead_letters_go_only_with_it() {
    let mut outbox = outbox("part_archive").await;
    ok(&maintain(&mut outbox, "[partitions]\n", "2020-01-15T00:00:00Z", &[]).0);
    // More rows than one export batch, and dead letters.
    let mut ids: HashSet<Uuid> = insert(&outbox, "2020-01-02", "COMPLETED", 12_001)
        .await
        .into_iter()
        .collect();
    let dead = insert(&outbox, "2020-01-20", "DEAD_LETTER", 2).await;
    ids.extend(dead.iter().copied());
    let expected: BTreeMap<String, Value> = outbox
        .client
        .query(
            &format!(
                "SELECT tracking_id::text, to_jsonb(o) FROM {}.outbox_2020_01 o",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(expected.len(), 12_003);

    let retain = "[partitions]\nretain = \"30d\"\n";
    // Without an archive the dead letters keep the partition.
    let (out, report) = maintain(&mut outbox, retain, "2020-04-01T00:00:00Z", &[]);
    ok(&out);
    assert!(kept_reason(&report, "outbox_2020_01").contains("--archive-dir"));
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 12_003);

    let dir = temp_dir("part_archive");
    let (out, report) = maintain(
        &mut outbox,
        retain,
        "2020-04-01T00:00:00Z",
        &["--archive-dir", dir.to_str().unwrap()],
    );
    ok(&out);
    let retired = &report["retired"][0];
    assert_eq!(retired["name"], format!("{}.outbox_2020_01", outbox.name));
    assert_eq!(retired["archived_rows"], 12_003);
    assert_eq!(retired["dead_letter"], 2);
    let path = PathBuf::from(retired["archive"].as_str().unwrap());
    assert_eq!(
        path,
        dir.join(format!(
            "{}.outbox.20200101T000000Z--20200201T000000Z.jsonl.gz",
            outbox.name
        ))
    );
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 0, "dropped");
    assert!(!partitions(&outbox).await.contains_key("outbox_2020_01"));

    // Every row is in the archive, every column as it was.
    let lines = read_archive(&path);
    assert_eq!(lines.len(), 12_003);
    let mut seen = HashSet::new();
    for line in &lines {
        let id = line["tracking_id"].as_str().unwrap();
        assert!(seen.insert(id.to_owned()), "{id} archived twice");
        let want = &expected[id];
        for column in [
            "id",
            "aggregate_id",
            "aggregate_type",
            "event_type",
            "payload",
            "metadata",
            "status",
            "retry_count",
            "max_retries",
            "last_error",
        ] {
            assert_eq!(line[column], want[column], "{id}: {column}");
        }
        assert!(line["created_at"].as_str().unwrap().starts_with("2020-01-"));
    }
    let archived: HashSet<Uuid> = seen.iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(archived, ids);
    for d in &dead {
        let line = lines
            .iter()
            .find(|l| l["tracking_id"] == d.to_string())
            .unwrap();
        assert_eq!(line["status"], "DEAD_LETTER");
        assert_eq!(line["last_error"], "broker: message too large");
    }
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".partial")),
        "no partial file left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_cannot_be_written_drops_nothing() {
    let mut outbox = outbox("part_archive_fail").await;
    ok(&maintain(&mut outbox, "[partitions]\n", "2020-01-15T00:00:00Z", &[]).0);
    insert(&outbox, "2020-01-02", "COMPLETED", 10).await;
    insert(&outbox, "2020-02-02", "COMPLETED", 10).await;
    let retain = "[partitions]\nretain = \"30d\"\n";
    let dir = temp_dir("part_archive_fail");

    // 1. Not a directory (a file is in the way; root cannot write there either).
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let not_a_dir = file.join("archive");
    outbox.extra_config = retain.to_owned();
    let mut cmd = outbox.admin_command();
    cmd.args(["partitions", "maintain", "--now", "2020-04-15T00:00:00Z"])
        .arg("--archive-dir")
        .arg(&not_a_dir);
    let out = output_checked(&mut cmd);
    assert!(!out.status.success(), "must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("archive"), "{stderr}");
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 10);
    assert_eq!(rows_in(&outbox, "outbox_2020_02").await, 10);

    // 2. The export is written, but its final name is taken by a directory:
    //    the rename fails inside the transaction, which rolls back.
    let archive = dir.join("archive");
    std::fs::create_dir_all(archive.join(format!(
        "{}.outbox.20200101T000000Z--20200201T000000Z.jsonl.gz",
        outbox.name
    )))
    .unwrap();
    let (out, report) = maintain(
        &mut outbox,
        retain,
        "2020-04-15T00:00:00Z",
        &["--archive-dir", archive.to_str().unwrap()],
    );
    assert!(!out.status.success(), "must fail: {report:#}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("outbox_2020_01") && error.contains("nothing was dropped"),
        "{error}"
    );
    assert_eq!(names(&report["retired"]), Vec::<String>::new());
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 10, "not dropped");
    assert_eq!(
        rows_in(&outbox, "outbox_2020_02").await,
        10,
        "the run stopped at the first failure"
    );
    assert!(partitions(&outbox).await.contains_key("outbox_2020_01"));
    let leftovers: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // 3. Out of the way, both go, each archived.
    std::fs::remove_dir_all(&archive).unwrap();
    let (out, report) = maintain(
        &mut outbox,
        retain,
        "2020-04-15T00:00:00Z",
        &["--archive-dir", archive.to_str().unwrap()],
    );
    ok(&out);
    assert_eq!(names(&report["retired"]).len(), 2);
    for r in report["retired"].as_array().unwrap() {
        assert_eq!(
            read_archive(Path::new(r["archive"].as_str().unwrap())).len(),
            10
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_row_committed_while_maintain_waits_for_the_lock_keeps_its_partition() {
    let mut outbox = outbox("part_race").await;
    ok(&maintain(&mut outbox, "[partitions]\n", "2020-01-15T00:00:00Z", &[]).0);
    insert(&outbox, "2020-01-02", "COMPLETED", 5).await;
    let retain = "[partitions]\nretain = \"30d\"\n";

    // An application inserts an event with an old created_at, in a
    // transaction still open when maintain looks.
    let mut app = harness::connect().await;
    let tx = app.transaction().await.unwrap();
    tx.execute(
        &format!(
            "INSERT INTO {}.outbox (aggregate_id, aggregate_type, event_type, payload, created_at) \
             VALUES (gen_random_uuid(), 'Order', 'Late', '{{}}', '2020-01-25T00:00:00Z')",
            outbox.name
        ),
        &[],
    )
    .await
    .unwrap();

    outbox.extra_config = retain.to_owned();
    let mut cmd = outbox.admin_command();
    cmd.args([
        "partitions",
        "maintain",
        "--json",
        "--now",
        "2020-04-15T00:00:00Z",
        "--lock-timeout",
        "2m",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // Its first look saw only COMPLETED rows (the insert is not committed);
    // now it waits to detach the partition.
    let parent = format!("{}.outbox", outbox.name);
    wait_for(
        "maintain to wait for the outbox's lock",
        DEADLINE,
        || async {
            outbox
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted \
                   AND relation = $1::text::regclass AND mode = 'AccessExclusiveLock')",
                    &[&parent],
                )
                .await
                .unwrap()
                .get::<_, bool>(0)
                .then_some(())
        },
    )
    .await;
    tx.commit().await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    ok(&out);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // (February, empty, goes.)
    assert_eq!(
        names(&report["retired"]),
        [format!("{}.outbox_2020_02", outbox.name)]
    );
    assert!(kept_reason(&report, "outbox_2020_01").contains("1 PENDING"));
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 6, "nothing lost");

    // The late event is delivered; then a long reader holds the outbox
    // past the lock timeout: kept, and said so; nothing changes.
    outbox
        .client
        .execute(
            &format!(
                "UPDATE {}.outbox SET status = 'COMPLETED', processed_at = now() WHERE event_type = 'Late'",
                outbox.name
            ),
            &[],
        )
        .await
        .unwrap();
    let tx = app.transaction().await.unwrap();
    tx.query(&format!("SELECT count(*) FROM {}.outbox", outbox.name), &[])
        .await
        .unwrap();
    let (out, report) = maintain(
        &mut outbox,
        retain,
        "2020-04-15T00:00:00Z",
        &["--lock-timeout", "1s"],
    );
    ok(&out);
    assert!(
        kept_reason(&report, "outbox_2020_01").contains("lock timeout"),
        "{report:#}"
    );
    tx.commit().await.unwrap();
    assert_eq!(rows_in(&outbox, "outbox_2020_01").await, 6);
    // Free and all delivered: retired.
    let (out, report) = maintain(&mut outbox, retain, "2020-04-15T00:00:00Z", &[]);
    ok(&out);
    assert_eq!(names(&report["retired"]).len(), 1, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_keeps_partitions_ahead_as_its_role_while_it_runs() {
    let mut outbox = outbox("part_relay").await;
    outbox.extra_config = "[partitions]\nahead = 2\nmaintain_interval_s = 1\n".into();
    let outbox = outbox;
    let s = outbox.name.clone();
    // The relay may create partitions only through the function that uses
    // the server's clock.
    for (expr, want) in [
        (
            format!("has_function_privilege('{RELAY_ROLE}', '{s}.pgoutbox_ensure_partitions(regclass, int, text)', 'EXECUTE')"),
            true,
        ),
        (
            format!("has_function_privilege('{RELAY_ROLE}', '{s}.pgoutbox_create_partitions(regclass, int, text, timestamptz)', 'EXECUTE')"),
            false,
        ),
    ] {
        let got: bool = outbox
            .client
            .query_one(&format!("SELECT {expr}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{expr}");
    }

    let count = || async {
        outbox
            .client
            .query_one(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = $1::text::regclass",
                &[&format!("{s}.outbox")],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(count().await, 2, "migrate: this month and the next");
    let relay = outbox.start_relay();
    wait_for("the partition two months ahead", DEADLINE, || async {
        (count().await == 3).then_some(())
    })
    .await;
    // Take the newest away: the background task puts it back.
    let newest: String = outbox
        .client
        .query_one(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
              WHERE i.inhparent = $1::text::regclass ORDER BY c.relname DESC LIMIT 1",
            &[&format!("{s}.outbox")],
        )
        .await
        .unwrap()
        .get(0);
    outbox
        .client
        .batch_execute(&format!("DROP TABLE {s}.{newest}"))
        .await
        .unwrap();
    assert_eq!(count().await, 2);
    wait_for(
        "the background task to create it again",
        DEADLINE,
        || async { (count().await == 3).then_some(()) },
    )
    .await;
    let owner: String = outbox
        .client
        .query_one(
            "SELECT pg_get_userbyid(relowner)::text FROM pg_class WHERE oid = $1::text::regclass",
            &[&format!("{s}.{newest}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(owner, RELAY_ROLE, "created as the table's owner");
    let status = relay.terminate();
    assert!(status.success());
}

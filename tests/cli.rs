//! Bad input gets a clear one-line error, a non-zero exit, no panic, no hang
//! and no secret; a lost slot stops the relay loudly (invariant 9).

mod common;

use std::process::Output;
use std::time::Duration;

use common::harness::{read_until_all, run_with_timeout, wait_for, TestOutbox};
use serde_json::json;
use uuid::Uuid;

/// The last stderr line, which must be the one-line error.
fn error_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("error: "),
        "stderr ends with an error line:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "no panic:\n{stderr}");
    last
}

#[tokio::test]
async fn unknown_config_key_is_rejected_with_its_line() {
    let mut outbox = TestOutbox::new("cli_config").await;
    outbox.extra_config = "[kafka]\nlinger = 5\n".into();
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let line = error_line(&out);
    assert!(line.contains("line 2") && line.contains("linger"), "{line}");
}

#[tokio::test]
async fn invalid_values_name_the_field_and_the_constraint() {
    let mut outbox = TestOutbox::new("cli_values").await;
    outbox.env.push(("OUTBOX_SLOT".into(), "bad;slot".into()));
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    let line = error_line(&out);
    assert!(
        line.contains("cdc.slot") && line.contains("lower-case"),
        "{line}"
    );

    let mut outbox = TestOutbox::new("cli_values").await;
    outbox.env.push(("OUTBOX_BATCH_SIZE".into(), "lots".into()));
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(30));
    let line = error_line(&out);
    assert!(line.contains("OUTBOX_BATCH_SIZE"), "{line}");
}

#[tokio::test]
async fn wrong_password_fails_fast_without_showing_the_password() {
    let mut outbox = TestOutbox::new("cli_password").await;
    let url = common::services()
        .database_url
        .replace("pgoutbox:pgoutbox@", "pgoutbox:Sup3rS3cretPw@");
    outbox.env.push(("DATABASE_URL".into(), url));
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let line = error_line(&out);
    assert!(line.contains("password"), "says what to fix: {line}");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains("Sup3rS3cretPw"),
        "the password leaked:\n{all}"
    );
}

#[tokio::test]
async fn unreachable_database_fails_with_a_hint() {
    let mut outbox = TestOutbox::new("cli_unreachable").await;
    outbox.env.push((
        "DATABASE_URL".into(),
        "postgres://u:Sup3rS3cretPw@127.0.0.1:1/db?connect_timeout=3".into(),
    ));
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let line = error_line(&out);
    assert!(line.contains("reachable"), "{line}");
    assert!(!line.contains("Sup3rS3cretPw"));
}

#[tokio::test]
async fn missing_publication_says_to_run_migrate() {
    let mut outbox = TestOutbox::new("cli_no_pub").await;
    outbox
        .env
        .push(("OUTBOX_PUBLICATION".into(), "no_such_pub".into()));
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let line = error_line(&out);
    assert!(
        line.contains("no_such_pub") && line.contains("pgoutbox migrate"),
        "{line}"
    );
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let outbox = TestOutbox::new("cli_migrate").await;
    let out = run_with_timeout(
        outbox.command_with_args(&["migrate"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success());
    let n: i64 = outbox
        .client
        .query_one(
            "SELECT count(*) FROM public.pgoutbox_migrations WHERE target = 'cli_migrate.outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, pgoutbox::outbox::MIGRATIONS.len());
    let parts: i64 = outbox
        .client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'cli_migrate.outbox'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(parts >= 2, "current and next partitions exist");
}

/// A relay delivers one event and stops; then its slot disappears and an
/// event is committed. Returns that event's tracking id.
async fn lose_the_slot(outbox: &TestOutbox) -> Uuid {
    let relay = outbox.start_relay();
    let first = outbox
        .publish("Order", Uuid::new_v4(), "First", &json!({}))
        .await;
    read_until_all(
        vec![outbox.topic("Order")],
        vec![first],
        Duration::from_secs(120),
    )
    .await;
    assert!(relay.terminate().success());
    outbox.drop_slot().await;
    outbox
        .publish("Order", Uuid::new_v4(), "WhileLost", &json!({}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_stops_the_relay_when_asked_and_is_then_only_recreated_on_request() {
    let outbox = TestOutbox::new("cli_lost_slot").await;
    let while_lost = lose_the_slot(&outbox).await;
    let mut stop = outbox.command_with_args(&["run"]);
    stop.env("OUTBOX_ON_SLOT_LOST", "stop");
    let out = run_with_timeout(stop, Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let line = error_line(&out);
    assert!(
        line.contains("no longer exists") && line.contains("--recreate-slot"),
        "{line}"
    );
    assert_eq!(
        outbox.confirmed_flush().await,
        0,
        "the slot was not recreated silently"
    );

    // The operator's explicit choice recreates it and backfills PENDING rows.
    let mut cmd = outbox.command();
    cmd.args(["run", "--recreate-slot"]);
    let relay = common::harness::Relay::spawn(cmd, &outbox.name);
    let records = read_until_all(
        vec![outbox.topic("Order")],
        vec![while_lost],
        Duration::from_secs(120),
    )
    .await;
    assert!(records
        .iter()
        .any(|r| r.header("tracking_id") == while_lost.to_string()));
    assert!(relay.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_dropped_while_streaming_stops_the_relay_when_asked() {
    let mut outbox = TestOutbox::new("cli_drop_live").await;
    outbox
        .env
        .push(("OUTBOX_ON_SLOT_LOST".into(), "stop".into()));
    let relay = outbox.start_relay();
    let first = outbox
        .publish("Order", Uuid::new_v4(), "First", &json!({}))
        .await;
    read_until_all(
        vec![outbox.topic("Order")],
        vec![first],
        Duration::from_secs(120),
    )
    .await;
    // Terminate the walsender and drop the slot before the relay reconnects.
    wait_for("slot dropped", Duration::from_secs(60), || async {
        let _ = outbox
            .client
            .execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&outbox.slot()],
            )
            .await;
        outbox.client.execute("SELECT pg_drop_replication_slot($1)", &[&outbox.slot()]).await.ok()
    })
    .await;
    let (status, log) = relay.wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "non-zero exit");
    assert!(log.contains("no longer exists"), "clear message:\n{log}");
}

/// A throwaway PostgreSQL cluster with `wal_level = replica`.
struct ReplicaCluster {
    dir: std::path::PathBuf,
    bin: String,
    port: u16,
}

impl ReplicaCluster {
    fn as_owner(&self, program: &str) -> std::process::Command {
        let path = format!("{}/{program}", self.bin);
        // PostgreSQL refuses to run as root: use the postgres system user.
        if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &path]);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn start() -> ReplicaCluster {
        let bin = std::env::var("PGOUTBOX_PG_BIN")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("replica-cluster");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = ReplicaCluster {
            dir,
            bin,
            port: 54391,
        };
        if unsafe { libc::geteuid() } == 0 {
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&cluster.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the test cluster dir");
        }
        let data = cluster.dir.join("data");
        let out = cluster
            .as_owner("initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let opts = format!(
            "-c wal_level=replica -c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories={}",
            cluster.port,
            cluster.dir.display()
        );
        let out = cluster
            .as_owner("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(cluster.dir.join("log"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }
}

impl Drop for ReplicaCluster {
    fn drop(&mut self) {
        let _ = self
            .as_owner("pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.dir.join("data"))
            .output();
    }
}

#[tokio::test]
async fn wal_level_replica_is_reported_with_the_setting_to_change() {
    let cluster = ReplicaCluster::start();
    let mut outbox = TestOutbox::new("cli_wal_level").await;
    outbox.env.push((
        "DATABASE_URL".into(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port),
    ));
    let out = run_with_timeout(
        outbox.command_with_args(&["migrate"]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_with_timeout(outbox.command_with_args(&["run"]), Duration::from_secs(60));
    assert_ne!(out.status.code(), Some(0));
    let line = error_line(&out);
    assert!(
        line.contains("wal_level") && line.contains("logical") && line.contains("restart"),
        "{line}"
    );
}

#[tokio::test]
async fn the_rust_publish_api_joins_the_callers_transaction() {
    let outbox = TestOutbox::new("cli_publish_api").await;
    let mut client = common::harness::connect().await;
    let payload = json!({"total": 42});
    let event = pgoutbox::outbox::NewEvent {
        aggregate_type: "Order",
        aggregate_id: Uuid::new_v4(),
        event_type: "Created",
        payload: &payload,
        metadata: None,
    };
    let tx = client.transaction().await.unwrap();
    let rolled_back = pgoutbox::outbox::publish(&tx, &outbox.name, &event)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let committed = pgoutbox::outbox::publish(&tx, &outbox.name, &event)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let ids: Vec<Uuid> = outbox
        .client
        .query(
            &format!("SELECT tracking_id FROM {}.outbox", outbox.name),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![committed]);
    assert_ne!(rolled_back, committed);
}

/// The default with marking (`cdc.on_slot_lost = "recreate"`): a slot lost
/// while the relay was down is recreated, loudly, and the rows written
/// meanwhile are backfilled; `pgoutbox status` and the metric say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_slot_is_recreated_loudly_and_nothing_is_lost() {
    let mut outbox = TestOutbox::new("cli_slot_recreate").await;
    let port = common::harness::free_port();
    outbox
        .env
        .push(("OUTBOX_METRICS_LISTEN".into(), format!("127.0.0.1:{port}")));
    let while_lost = lose_the_slot(&outbox).await;
    let relay = outbox.start_relay();
    read_until_all(
        vec![outbox.topic("Order")],
        vec![while_lost],
        Duration::from_secs(120),
    )
    .await;
    let metrics = wait_for("the recovery counted", Duration::from_secs(30), || async {
        let body = reqwest_metrics(port).await?;
        body.lines()
            .any(|l| l.starts_with("pgoutbox_slot_recoveries_total{") && l.ends_with(" 1"))
            .then_some(body)
    })
    .await;
    assert!(metrics.contains("pgoutbox_slot_recoveries_total"));
    let log = relay.log_text();
    assert!(
        log.contains("ERROR") && log.contains("recreated the lost replication slot"),
        "{log}"
    );
    let status = outbox.run_ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(
        status["slot"]["last_recovery_at"].is_string()
            && status["slot"]["last_recovery_reason"]
                .as_str()
                .is_some_and(|r| r.contains("no longer exists")),
        "{status}"
    );
    assert!(relay.terminate().success());
}

/// The relay's /metrics text, when it answers.
async fn reqwest_metrics(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    Some(body)
}

//! Zero-gap takeover of a running Debezium's replication slot by pgoutbox,
//! against the real Debezium: Kafka Connect standalone with the PostgreSQL
//! connector and the Outbox Event Router, installed and run by
//! `scripts/debezium` (jars from Maven Central, cached).
//!
//! Each scenario creates Debezium's default outbox table in a schema of its
//! own (as an application would; not `pgoutbox migrate`), starts Debezium
//! on it under continuous inserts, stops Debezium (cleanly or with SIGKILL),
//! converts its connector file with `pgoutbox import-debezium`, runs
//! `pgoutbox adopt` and then `pgoutbox run` on the same slot while the
//! inserts go on, and reads every record back from Kafka with an independent
//! consumer. It asserts that no committed row is missing, that every
//! duplicate is a transaction that could have committed after the slot's
//! confirmed position at the handover, and that every record — Debezium's
//! and pgoutbox's — carries the topic, key, value and headers the router
//! gives the row (the records of a row sent by both byte-identical but for
//! Debezium's `__debezium.context.*` headers). The rollback scenario then
//! stops pgoutbox and goes back to Debezium on the slot, with its own config
//! dir and offsets file: once the slot's restart_lsn has moved past the
//! commit Debezium recorded (which PostgreSQL does while pgoutbox confirms),
//! Debezium refuses that offset ("Last recorded offset is no longer
//! available on the server"), so the way back moves the connector's offset
//! to the slot's confirmed position with Kafka Connect's offsets API
//! (`PUT /connectors/<name>/stop`, `PATCH /connectors/<name>/offsets`,
//! `PUT /connectors/<name>/resume`) — asserted, both.
//!
//! The scenarios run one at a time (each runs a JVM). They are skipped,
//! saying why, when Java 17+ is missing or `scripts/debezium install`
//! cannot fetch the jars; `PGOUTBOX_TEST_REQUIRE_DEBEZIUM=1` makes that a
//! failure instead. Each prints a `TAKEOVER <scenario>: …` summary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::harness::{
    connect, free_port, read_topics, run_with_timeout, run_with_timeout_checked,
    topic_record_count, wait_for, Record, Relay,
};
use common::services;
use tokio_postgres::Client;
use uuid::Uuid;

/// One JVM at a time: two Kafka Connect workers next to the relays and the
/// load would starve a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest wait for any one condition.
const DEADLINE: Duration = Duration::from_secs(120);

/// Debezium 3.2+ adds these headers (connector name, logical name, task id,
/// a random run id per start) to every record; pgoutbox does not.
const CONTEXT: &str = "__debezium.context.";

/// Aggregate types: each routes to a topic of its own.
const TYPES: [&str; 2] = ["Order", "Payment"];

/// Aggregates the load writes to (alternating between the types).
const AGGREGATES: usize = 6;

/// Records each relay must send in its phase beyond the backlog it found
/// (rows committed before it started): about 4 s of the load.
const PER_PHASE: i64 = 1500;

/// SIGKILLs Connect workers an earlier run of scenario `name` left behind
/// (that run itself killed, its `Drop` never ran): they hold the slot.
/// Found by their config dir, which only this file creates.
fn kill_leftover_workers(name: &str) {
    let mark = format!("/debezium/{name}-");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("org.apache.kafka.connect.cli.ConnectStandalone")
            && cmdline.contains(env!("CARGO_TARGET_TMPDIR"))
            && cmdline.contains(&mark)
        {
            eprintln!("killing a Connect worker left by an earlier run: pid {pid}");
            // SAFETY: kill(2) on a worker this test file started (its
            // command line names a config dir only this file creates).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The server's current WAL insert position.
async fn wal_insert_lsn(client: &Client) -> u64 {
    client
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint",
            &[],
        )
        .await
        .expect("read the WAL insert position")
        .get::<_, i64>(0) as u64
}

fn lsn(v: u64) -> String {
    format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff)
}

/// One scenario: the schema `<name>` with Debezium's default outbox table,
/// the publication `<name>_pub`, the slot `<name>_slot`, the topics
/// `<prefix>.<aggregatetype>`, and a directory with the Connect worker's and
/// the connector's `.properties` (and the offsets file), Debezium's state
/// (pid, logs) and pgoutbox's configuration.
struct Scenario {
    name: String,
    client: Client,
    prefix: String,
    dir: PathBuf,
    state: PathBuf,
    rest_port: u16,
}

impl Scenario {
    async fn new(name: &str) -> Scenario {
        kill_leftover_workers(name);
        let client = connect().await;
        // A slot left by an earlier run goes (once its walsender, if any,
        // has exited): this run's Debezium creates it afresh.
        let slot = format!("{name}_slot");
        wait_for("an earlier run's slot to be dropped", DEADLINE, || async {
            client
                .query_one(
                    "WITH gone AS (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                        WHERE slot_name = $1 AND NOT active) \
                     SELECT (SELECT count(*) FROM gone), \
                            (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active)",
                    &[&slot],
                )
                .await
                .ok()
                .filter(|r| r.get::<_, i64>(1) == 0)
                .map(|_| ())
        })
        .await;
        let _ = client
            .batch_execute(&format!(
                "DELETE FROM public.pgoutbox_migrations WHERE target LIKE '{name}.%'"
            ))
            .await;
        // Debezium's default outbox table, as its documentation gives it.
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; DROP PUBLICATION IF EXISTS {name}_pub; \
                 CREATE SCHEMA {name}; \
                 CREATE TABLE {name}.outbox (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
                   aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb); \
                 CREATE PUBLICATION {name}_pub FOR TABLE {name}.outbox WITH (publish = 'insert');"
            ))
            .await
            .expect("create Debezium's outbox table");
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("debezium")
            .join(format!("{name}-{unique}"));
        let dir = root.join("config");
        let state = root.join("state");
        std::fs::create_dir_all(&dir).expect("create the config dir");
        std::fs::create_dir_all(&state).expect("create the state dir");
        let sc = Scenario {
            name: name.to_owned(),
            client,
            prefix: format!("{name}-{unique}"),
            dir,
            state,
            rest_port: free_port(),
        };
        sc.write_properties();
        sc
    }

    fn slot(&self) -> String {
        format!("{}_slot", self.name)
    }

    fn publication(&self) -> String {
        format!("{}_pub", self.name)
    }

    /// The router's `route.topic.replacement`: this run's topics only.
    fn replacement(&self) -> String {
        format!("{}.${{routedByValue}}", self.prefix)
    }

    /// The topic the router gives `aggregatetype`.
    fn topic(&self, aggregatetype: &str) -> String {
        format!("{}.{aggregatetype}", self.prefix)
    }

    fn topics(&self) -> Vec<String> {
        TYPES.iter().map(|t| self.topic(t)).collect()
    }

    fn connector_file(&self) -> PathBuf {
        self.dir.join("connector.properties")
    }

    /// Records in this run's topics.
    fn records_sent(&self) -> i64 {
        self.topics().iter().map(|t| topic_record_count(t)).sum()
    }

    /// worker.properties and connector.properties, used as they are by
    /// `scripts/debezium start` (they do not start with its marker line).
    fn write_properties(&self) {
        let s = services();
        let pg: tokio_postgres::Config = s.database_url.parse().expect("DATABASE_URL");
        let host = match pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            other => panic!("the Debezium connector needs a TCP host, not {other:?}"),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let user = pg.get_user().unwrap_or("postgres");
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let db = pg.get_dbname().unwrap_or(user);
        let plugins = common::debezium::script(&["paths"])
            .output()
            .expect("scripts/debezium paths");
        let plugins = String::from_utf8_lossy(&plugins.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("plugins: ").map(str::to_owned))
            .expect("scripts/debezium paths names the plugin dir");
        let dir = self.dir.display();
        let converter = "org.apache.kafka.connect.storage.StringConverter";
        // As scripts/debezium writes it: string converters (the value is the
        // payload's JSON text), offsets flushed every 100 ms (Debezium
        // confirms the slot's position only when it commits offsets).
        let worker = format!(
            "# Written by tests/debezium_takeover.rs (Kafka Connect standalone worker)\n\
             bootstrap.servers={brokers}\n\
             key.converter={converter}\n\
             value.converter={converter}\n\
             offset.storage.file.filename={dir}/offsets.dat\n\
             offset.flush.interval.ms=100\n\
             plugin.path={plugins}\n\
             listeners=http://127.0.0.1:{rest_port}\n\
             rest.advertised.host.name=127.0.0.1\n",
            brokers = s.kafka_brokers,
            rest_port = self.rest_port,
        );
        let name = &self.name;
        let connector = format!(
            "# Written by tests/debezium_takeover.rs: Debezium's outbox connector with\n\
             # its default outbox table and router options, but the topics.\n\
             name={name}\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             tasks.max=1\n\
             database.hostname={host}\n\
             database.port={port}\n\
             database.user={user}\n\
             database.password={password}\n\
             database.dbname={db}\n\
             topic.prefix={name}\n\
             plugin.name=pgoutput\n\
             slot.name={slot}\n\
             publication.name={publication}\n\
             publication.autocreate.mode=disabled\n\
             table.include.list={name}.outbox\n\
             snapshot.mode=no_data\n\
             tombstones.on.delete=false\n\
             heartbeat.interval.ms=1000\n\
             key.converter={converter}\n\
             value.converter={converter}\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.route.topic.replacement={replacement}\n",
            slot = self.slot(),
            publication = self.publication(),
            replacement = self.replacement(),
        );
        std::fs::write(self.dir.join("worker.properties"), worker)
            .expect("write worker.properties");
        std::fs::write(self.connector_file(), connector).expect("write connector.properties");
    }

    /// `scripts/debezium <args>` for this scenario's worker.
    fn debezium(&self, args: &[&str], timeout: Duration) -> Output {
        let s = services();
        let mut cmd = common::debezium::script(args);
        cmd.env("PGOUTBOX_DEBEZIUM_DIR", &self.state)
            .env("PGOUTBOX_DEBEZIUM_REST_PORT", self.rest_port.to_string())
            .env("DBZ_HEAP_OPTS", "-Xms128M -Xmx768M")
            .env("DBZ_TIMEOUT", "100")
            .env("DATABASE_URL", &s.database_url)
            .env("KAFKA_BROKERS", &s.kafka_brokers);
        run_with_timeout(cmd, timeout)
    }

    /// The worker's log (the last `lines` lines).
    fn debezium_log(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.state.join("connect.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The JVM's thread dump `scripts/debezium stop` asked for when the
    /// worker was slow to stop (the first 150 lines), or why there is none.
    fn thread_dump(&self) -> String {
        let text = std::fs::read_to_string(self.state.join("connect.out")).unwrap_or_default();
        match text.rfind("Full thread dump") {
            Some(at) => {
                let dump: Vec<&str> = text[at..].lines().take(150).collect();
                dump.join("\n")
            }
            None => "no thread dump in connect.out".to_owned(),
        }
    }

    /// Starts Debezium (RUNNING) and waits until its slot exists and is
    /// streaming; returns how long that took.
    async fn start_debezium(&self) -> Duration {
        let t0 = Instant::now();
        let dir = self.dir.to_str().expect("UTF-8 path").to_owned();
        let out = self.debezium(&["start", &dir], Duration::from_secs(150));
        assert!(
            out.status.success(),
            "scripts/debezium start failed:\n{}\n--- connect.log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.debezium_log(60)
        );
        wait_for("Debezium's slot to be streaming", DEADLINE, || async {
            matches!(self.slot_state().await, Some((true, _))).then_some(())
        })
        .await;
        t0.elapsed()
    }

    /// The worker's pid, from `scripts/debezium pid`.
    fn debezium_pid(&self) -> i32 {
        let out = self.debezium(&["pid"], Duration::from_secs(30));
        assert!(out.status.success(), "Debezium is not running");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Stops Debezium, cleanly (`scripts/debezium stop`: SIGTERM, offsets
    /// committed) or with SIGKILL, and waits until its walsender is gone.
    async fn stop_debezium(&self, how: Stop) -> Duration {
        let t0 = Instant::now();
        match how {
            Stop::Clean => {
                // scripts/debezium waits up to 120 s (Debezium's own
                // shutdown allows its streaming thread 90 s).
                let out = self.debezium(&["stop"], Duration::from_secs(180));
                assert!(
                    out.status.success(),
                    "scripts/debezium stop failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let said = String::from_utf8_lossy(&out.stderr);
                assert!(
                    !said.contains("SIGKILL"),
                    "Debezium did not stop on SIGTERM: {said}\n--- connect.log:\n{}\n--- {}",
                    self.debezium_log(40),
                    self.thread_dump()
                );
                if said.contains("thread dump") {
                    // Slow but clean: say so, with where it waited.
                    eprintln!("{said}--- {}", self.thread_dump());
                }
            }
            Stop::Kill => {
                let pid = self.debezium_pid();
                // SAFETY: kill(2) on the pid scripts/debezium checked is its
                // Connect worker.
                assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "SIGKILL");
                wait_for("the killed worker to be gone", DEADLINE, || async {
                    let stat =
                        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    // Gone, or a zombie not yet reaped by init.
                    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                    (stat.is_empty() || state.starts_with('Z')).then_some(())
                })
                .await;
            }
        }
        wait_for("Debezium's walsender to exit", DEADLINE, || async {
            matches!(self.slot_state().await, Some((false, _))).then_some(())
        })
        .await;
        t0.elapsed()
    }

    /// The worker's pid if it runs (read directly, for `Drop`).
    fn running_worker(&self) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.state.join("connect.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains("org.apache.kafka.connect.cli.ConnectStandalone")
            .then_some(pid)
    }

    /// The slot's (active, confirmed_flush_lsn), if it exists.
    async fn slot_state(&self) -> Option<(bool, u64)> {
        self.client
            .query_opt(
                "SELECT active, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .expect("read the slot")
            .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0) as u64))
    }

    /// The slot's restart_lsn (0 when the slot does not exist).
    async fn restart_lsn(&self) -> u64 {
        self.client
            .query_opt(
                "SELECT (restart_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .expect("read the slot")
            .and_then(|r| r.get::<_, Option<i64>>(0))
            .unwrap_or(0) as u64
    }

    /// The offset Debezium recorded in the worker's offsets file (a Java
    /// serialised map whose value is the offset's JSON text), as JSON.
    fn stored_offset(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.dir.join("offsets.dat")).expect("read offsets.dat");
        let text = String::from_utf8_lossy(&bytes);
        let re = regex::Regex::new(r#"\{"[^{}]*"lsn"[^{}]*\}"#).unwrap();
        let json = re
            .find_iter(&text)
            .last()
            .unwrap_or_else(|| panic!("no offset in offsets.dat: {text:?}"));
        serde_json::from_str(json.as_str()).expect("the offset's JSON")
    }

    /// Kafka Connect's REST API: (HTTP status, body).
    fn rest(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(body) = body {
            c.args(["-H", "Content-Type: application/json", "--data", body]);
        }
        c.arg(format!("http://127.0.0.1:{}{path}", self.rest_port));
        let out = c.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// The connector's and its first task's state.
    fn connector_state(&self) -> (String, String) {
        let (_, body) = self.rest("GET", &format!("/connectors/{}/status", self.name), None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let state = |v: &serde_json::Value| v.as_str().unwrap_or("none").to_owned();
        (
            state(&v["connector"]["state"]),
            state(&v["tasks"][0]["state"]),
        )
    }

    /// Moves the (running worker's) connector to the slot's `confirmed`
    /// position with Kafka Connect's offsets API (KIP-875): stop, PATCH,
    /// resume. The offset says "every commit up to `confirmed` processed,
    /// no event after it": `lsn_commit` is the slot's confirmed position
    /// (a commit's end, as Debezium records it), `lsn`/`lsn_proc` (the last
    /// event processed) one below it — between that commit's last event
    /// and the first event after it, equal to no message's LSN, so
    /// Debezium's WalPositionLocator skips nothing.
    async fn reposition_debezium(&self, confirmed: u64, config: &std::path::Path) {
        let name = &self.name;
        let (code, body) = self.rest("PUT", &format!("/connectors/{name}/stop"), None);
        assert!(
            (200..300).contains(&code),
            "stop the connector: {code} {body}"
        );
        wait_for("the connector to be STOPPED", DEADLINE, || async {
            (self.connector_state().0 == "STOPPED").then_some(())
        })
        .await;
        let (code, body) = self.rest("GET", &format!("/connectors/{name}/offsets"), None);
        assert_eq!(code, 200, "read the connector's offsets: {body}");
        let current: serde_json::Value = serde_json::from_str(&body).expect("offsets JSON");
        let partition = current["offsets"][0]["partition"].clone();
        assert!(partition.is_object(), "no offset partition in {body}");
        // The body comes from `pgoutbox debezium-offset`, the documented
        // way back.
        let out = run_with_timeout_checked(
            self.pgoutbox(&[
                "--config",
                config.to_str().expect("UTF-8 path"),
                "debezium-offset",
                "--topic-prefix",
                &self.name,
            ]),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "pgoutbox debezium-offset failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let patch: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("debezium-offset prints JSON");
        assert_eq!(
            patch["offsets"][0]["partition"], partition,
            "the offset partition is the connector's"
        );
        assert_eq!(patch["offsets"][0]["offset"]["lsn_commit"], confirmed);
        assert_eq!(patch["offsets"][0]["offset"]["lsn"], confirmed - 1);
        let (code, reply) = self.rest(
            "PATCH",
            &format!("/connectors/{name}/offsets"),
            Some(&patch.to_string()),
        );
        assert_eq!(code, 200, "alter the connector's offsets: {reply}");
        eprintln!(
            "Debezium's offset moved with PATCH /connectors/{name}/offsets: {body} -> {patch}"
        );
        let (code, body) = self.rest("PUT", &format!("/connectors/{name}/resume"), None);
        assert!(
            (200..300).contains(&code),
            "resume the connector: {code} {body}"
        );
        wait_for(
            "the connector and its task to be RUNNING",
            DEADLINE,
            || async {
                let (connector, task) = self.connector_state();
                assert!(
                    task != "FAILED",
                    "Debezium's task failed after the offset was moved:\n{}",
                    self.debezium_log(40)
                );
                (connector == "RUNNING" && task == "RUNNING").then_some(())
            },
        )
        .await;
        wait_for("Debezium's slot to be streaming", DEADLINE, || async {
            matches!(self.slot_state().await, Some((true, _))).then_some(())
        })
        .await;
    }

    /// The outbox table's definition: columns, constraints, indexes,
    /// triggers, and the publications it is in.
    async fn table_definition(&self) -> Vec<String> {
        let rel = format!("{}.outbox", self.name);
        self.client
            .query(
                "SELECT 'column ' || attname || ' ' || format_type(atttypid, atttypmod) || ' ' || attnotnull::text \
                   FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                 UNION ALL SELECT 'constraint ' || pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = $1::text::regclass \
                 UNION ALL SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = $1::text::regclass \
                 UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgrelid = $1::text::regclass \
                 UNION ALL SELECT 'publication ' || pubname FROM pg_publication_tables \
                   WHERE schemaname = $2 AND tablename = 'outbox' \
                 UNION ALL SELECT 'replica identity ' || relreplident::text FROM pg_class WHERE oid = $1::text::regclass \
                 ORDER BY 1",
                &[&rel, &self.name],
            )
            .await
            .expect("read the table definition")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// A `pgoutbox` command: the environment cleared but for the brokers
    /// and logging; the database from the configuration file.
    fn pgoutbox(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgoutbox"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KAFKA_BROKERS", &services().kafka_brokers)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env("OUTBOX_METRICS_LISTEN", "off");
        cmd
    }

    /// `pgoutbox import-debezium connector.properties`, checked, written
    /// with the password file filled in (the password is never copied);
    /// returns the configuration file.
    fn import(&self) -> PathBuf {
        let connector = self.connector_file();
        let out = run_with_timeout_checked(
            self.pgoutbox(&["import-debezium", connector.to_str().expect("UTF-8 path")]),
            Duration::from_secs(30),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "import-debezium failed:\n{stderr}");
        eprintln!("--- pgoutbox import-debezium:\n{stdout}--- its warnings:\n{stderr}---");
        let pg: tokio_postgres::Config = services().database_url.parse().unwrap();
        let password = pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        // (The output is also searched for distinctive passwords by
        // run_with_timeout_checked.)
        assert!(
            (password.is_empty() || !stdout.contains(&format!(":{password}@")))
                && !stdout
                    .lines()
                    .any(|l| l.trim_start().starts_with("password =")),
            "the password was copied:\n{stdout}"
        );
        let cfg: toml::Value = toml::from_str(&stdout).expect("import-debezium prints TOML");
        let at = |path: &[&str]| -> Option<String> {
            let mut v = &cfg;
            for p in path {
                v = v.get(p)?;
            }
            v.as_str().map(str::to_owned)
        };
        let expect = |path: &[&str], want: &str| {
            assert_eq!(
                at(path).as_deref(),
                Some(want),
                "import-debezium: {} should be {want:?}:\n{stdout}",
                path.join(".")
            );
        };
        expect(&["outbox", "schema"], &self.name);
        expect(&["outbox", "table"], "outbox");
        expect(&["outbox", "columns", "preset"], "debezium");
        expect(&["cdc", "slot"], &self.slot());
        expect(&["cdc", "publication"], &self.publication());
        expect(&["kafka", "format"], "debezium");
        expect(
            &["kafka", "debezium", "route.topic.replacement"],
            &self.replacement(),
        );
        expect(&["kafka", "debezium", "converter"], "string");
        // The operator's one edit: the password file the import points at.
        let password_file = self.dir.join("pgoutbox-database-password");
        std::fs::write(&password_file, format!("{password}\n")).expect("write the password file");
        let path = toml::Value::String(password_file.display().to_string()).to_string();
        let mut replaced = false;
        let text: String = stdout
            .lines()
            .map(|l| {
                if l.trim_start().starts_with("password_file") {
                    replaced = true;
                    format!("password_file = {path}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        assert!(
            replaced,
            "import-debezium wrote no password_file line:\n{stdout}"
        );
        let file = self.dir.join("pgoutbox.toml");
        std::fs::write(&file, text).expect("write pgoutbox.toml");
        file
    }
}

/// A killed test leaves no JVM and no slot behind.
impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(pid) = self.running_worker() {
            // SAFETY: kill(2) on the Connect worker this scenario started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        common::harness::drop_slots_when_released(vec![self.slot()], Duration::from_secs(10));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Clean,
    Kill,
}

/// One transaction of the load.
#[derive(Clone, Debug)]
struct Tx {
    /// Its number: transactions begin in this order.
    index: u64,
    /// Its rows' ids.
    ids: Vec<Uuid>,
    /// `pg_current_wal_insert_lsn()` read after COMMIT returned: an upper
    /// bound of the commit record's LSN.
    upper: u64,
    committed: bool,
}

/// Continuous inserts into Debezium's outbox table: transactions of 1–3
/// rows, one every few milliseconds, on [`AGGREGATES`] aggregates, each
/// payload carrying its sequence number within its aggregate; every tenth
/// transaction rolled back.
struct Load {
    stop: Arc<AtomicBool>,
    begun: Arc<AtomicU64>,
    committed_rows: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Vec<Tx>>,
}

impl Load {
    fn start(schema: &str, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let begun = Arc::new(AtomicU64::new(0));
        let committed_rows = Arc::new(AtomicU64::new(0));
        let (s, b, c) = (stop.clone(), begun.clone(), committed_rows.clone());
        let insert = format!(
            "INSERT INTO {schema}.outbox (id, aggregatetype, aggregateid, type, payload) \
             VALUES ($1, $2, $3, 'Happened', $4::text::jsonb)"
        );
        let handle = tokio::spawn(async move {
            let mut client = connect().await;
            let insert = client.prepare(&insert).await.expect("prepare the insert");
            let aggregates: Vec<String> = (0..AGGREGATES)
                .map(|i| {
                    format!(
                        "{}-{}",
                        TYPES[i % TYPES.len()].to_lowercase(),
                        Uuid::new_v4()
                    )
                })
                .collect();
            let mut seq = [0u64; AGGREGATES];
            let mut txs = Vec::new();
            while !s.load(Ordering::SeqCst) {
                let n = b.fetch_add(1, Ordering::SeqCst);
                let rollback = n % 10 == 9;
                let tx = client.transaction().await.expect("BEGIN");
                let mut ids = Vec::new();
                for e in 0..1 + (n % 3) as usize {
                    let a = (n as usize * 7 + e) % AGGREGATES;
                    let id = Uuid::new_v4();
                    // Written as text so PostgreSQL's own jsonb text
                    // (key order, `1.50`, escapes) is what relays must send.
                    let payload = format!(
                        r#"{{"seq": {}, "tx": {n}, "amount": 1.50, "note": "a\u00e7\u00e3o \"quoted\" \\ {}", "aggregate": "{}"}}"#,
                        seq[a], "\u{1F680}", aggregates[a]
                    );
                    seq[a] += 1;
                    tx.execute(
                        &insert,
                        &[&id, &TYPES[a % TYPES.len()], &aggregates[a], &payload],
                    )
                    .await
                    .expect("INSERT");
                    ids.push(id);
                }
                if rollback {
                    tx.rollback().await.expect("ROLLBACK");
                } else {
                    tx.commit().await.expect("COMMIT");
                    c.fetch_add(ids.len() as u64, Ordering::SeqCst);
                }
                let upper = wal_insert_lsn(&client).await;
                txs.push(Tx {
                    index: n,
                    ids,
                    upper,
                    committed: !rollback,
                });
                tokio::time::sleep(pause).await;
            }
            txs
        });
        Load {
            stop,
            begun,
            committed_rows,
            handle,
        }
    }

    /// Transactions begun so far (the next one gets this number).
    fn begun(&self) -> u64 {
        self.begun.load(Ordering::SeqCst)
    }

    fn committed_rows(&self) -> u64 {
        self.committed_rows.load(Ordering::SeqCst)
    }

    async fn stop(self) -> Vec<Tx> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.expect("the load failed")
    }
}

/// A relay's turn on the slot.
#[derive(Clone, Debug)]
struct Phase {
    /// `debezium` or `pgoutbox`.
    relay: &'static str,
    /// The slot's confirmed_flush_lsn when it began (the previous relay
    /// stopped); `None` for the first.
    confirmed_at_start: Option<u64>,
    /// Transactions numbered from this one began after the previous relay
    /// stopped: only this phase or later ones can have sent them.
    first_tx: u64,
    /// The records in the topics when it began.
    records_at_start: i64,
    /// Its duration, start to stop.
    duration: Duration,
}

/// Waits until the topics hold `n` records, failing early if `relay`
/// exits.
async fn wait_records(
    sc: &Scenario,
    n: i64,
    mut relay: Option<&mut Relay>,
    what: &str,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if sc.records_sent() >= n {
            return t0.elapsed();
        }
        if let Some(r) = relay.as_deref_mut() {
            assert!(
                r.running(),
                "pgoutbox exited while {what}:\n{}",
                r.log_text()
            );
        }
        assert!(
            t0.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what} ({} of {n} records)",
            sc.records_sent()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A row of the outbox table, as PostgreSQL prints it.
struct Row {
    aggregatetype: String,
    aggregateid: String,
    payload: String,
}

/// Who sent a record: pgoutbox (no `__debezium.context.*` header) or a
/// Debezium run (its `runId`).
fn sender(r: &Record) -> Option<&str> {
    r.headers
        .iter()
        .any(|(k, _)| k.starts_with(CONTEXT))
        .then(|| r.header("__debezium.context.runId"))
}

/// The headers but Debezium's context ones, sorted.
fn comparable_headers(r: &Record) -> BTreeMap<&str, &str> {
    r.headers
        .iter()
        .filter(|(k, _)| !k.starts_with(CONTEXT))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The payload's sequence number within its aggregate.
fn seq_of(r: &Record) -> i64 {
    serde_json::from_str::<serde_json::Value>(&r.value)
        .ok()
        .and_then(|v| v["seq"].as_i64())
        .unwrap_or(-1)
}

/// Reads the table and every record of the topics, checks them against
/// each other and the phases, prints and returns the summary line.
async fn verify(sc: &Scenario, scenario: &str, txs: &[Tx], phases: &[Phase]) -> String {
    let rows: HashMap<String, Row> = sc
        .client
        .query(
            &format!(
                "SELECT id::text, aggregatetype, aggregateid, payload::text FROM {}.outbox",
                sc.name
            ),
            &[],
        )
        .await
        .expect("read the outbox rows")
        .iter()
        .map(|r| {
            (
                r.get(0),
                Row {
                    aggregatetype: r.get(1),
                    aggregateid: r.get(2),
                    payload: r.get::<_, Option<String>>(3).unwrap_or_default(),
                },
            )
        })
        .collect();
    let committed: usize = txs
        .iter()
        .filter(|t| t.committed)
        .map(|t| t.ids.len())
        .sum();
    assert_eq!(
        rows.len(),
        committed,
        "the table holds what the load committed"
    );
    let topics = sc.topics();
    let want: HashSet<String> = rows.keys().cloned().collect();
    let t0 = Instant::now();
    let records = tokio::task::spawn_blocking(move || {
        read_topics(&topics, DEADLINE, |recs| {
            let seen: HashSet<&str> = recs.iter().map(|r| r.header("id")).collect();
            want.iter().all(|w| seen.contains(w.as_str()))
        })
    })
    .await
    .expect("the reader");
    let read_in = t0.elapsed();
    let tx_of: HashMap<String, &Tx> = txs
        .iter()
        .flat_map(|t| t.ids.iter().map(move |id| (id.to_string(), t)))
        .collect();

    // Which phase sent each record: pgoutbox's by the missing context
    // headers, Debezium's runs by their runId, in the order they ran.
    let mut runs: Vec<(&str, u64)> = Vec::new();
    for r in &records {
        if let Some(run) = sender(r) {
            let first = tx_of.get(r.header("id")).map_or(u64::MAX, |t| t.index);
            match runs.iter_mut().find(|(id, _)| *id == run) {
                Some((_, min)) => *min = (*min).min(first),
                None => runs.push((run, first)),
            }
        }
    }
    runs.sort_by_key(|(_, first)| *first);
    let debezium_phases: Vec<usize> = (0..phases.len())
        .filter(|&i| phases[i].relay == "debezium")
        .collect();
    let pgoutbox_phase = phases
        .iter()
        .position(|p| p.relay == "pgoutbox")
        .expect("a pgoutbox phase");
    assert!(
        runs.len() <= debezium_phases.len(),
        "{} Debezium runIds for {} Debezium runs: {runs:?}",
        runs.len(),
        debezium_phases.len()
    );
    let phase_of = |r: &Record| -> usize {
        match sender(r) {
            None => pgoutbox_phase,
            Some(run) => debezium_phases[runs.iter().position(|(id, _)| *id == run).unwrap()],
        }
    };

    // Every record: the row's topic, key, value and id, as the router
    // makes them.
    let mut phantoms = Vec::new();
    for r in &records {
        let id = r.header("id");
        let Some(row) = rows.get(id) else {
            phantoms.push(format!("{} {id:?}", r.topic));
            continue;
        };
        let who = phases[phase_of(r)].relay;
        assert_eq!(
            r.topic,
            sc.topic(&row.aggregatetype),
            "topic of {id} ({who})"
        );
        assert_eq!(r.key, row.aggregateid, "key of {id} ({who})");
        assert_eq!(r.value, row.payload, "value of {id} ({who}), byte for byte");
    }
    assert!(
        phantoms.is_empty(),
        "records of no committed row (rolled back, or foreign): {phantoms:?}"
    );

    // Per row: who sent it, when.
    let mut by_id: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in &records {
        by_id.entry(r.header("id")).or_default().push(r);
    }
    let missing: Vec<&String> = rows
        .keys()
        .filter(|id| !by_id.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows never delivered, e.g. {:?}",
        missing.len(),
        rows.len(),
        &missing[..missing.len().min(5)]
    );
    let mut per_phase = vec![0usize; phases.len()];
    let mut duplicates = 0;
    let mut duplicate_window: Vec<(u64, u64)> = vec![(u64::MAX, 0); phases.len()];
    let mut violations = Vec::new();
    for (id, recs) in &by_id {
        let tx = tx_of[*id];
        let mut seen_in: Vec<usize> = recs.iter().map(|r| phase_of(r)).collect();
        seen_in.sort_unstable();
        for &p in &seen_in {
            per_phase[p] += 1;
        }
        if seen_in.windows(2).any(|w| w[0] == w[1]) {
            violations.push(format!("{id} sent twice within one phase: {seen_in:?}"));
        }
        // Nothing at or before the slot's confirmed position is sent
        // again; a transaction begun after a relay stopped is never sent by
        // it.
        for &p in &seen_in {
            if let Some(confirmed) = phases[p].confirmed_at_start {
                if tx.upper <= confirmed {
                    violations.push(format!(
                        "{id} (commit ≤ {}) sent by {} #{p} although the slot had confirmed {}",
                        lsn(tx.upper),
                        phases[p].relay,
                        lsn(confirmed)
                    ));
                }
            }
            if let Some(later) = phases.get(p + 1) {
                if tx.index >= later.first_tx {
                    violations.push(format!(
                        "{id} (transaction {} begun after phase #{p} ended) sent by {} #{p}",
                        tx.index, phases[p].relay
                    ));
                }
            }
        }
        if recs.len() > 1 {
            duplicates += recs.len() - 1;
            for &p in &seen_in[1..] {
                let w = &mut duplicate_window[p];
                w.0 = w.0.min(tx.upper);
                w.1 = w.1.max(tx.upper);
            }
            // The same bytes from both relays, Debezium's context aside.
            let first = recs[0];
            for other in &recs[1..] {
                assert_eq!(
                    (
                        &first.topic,
                        &first.key,
                        &first.value,
                        comparable_headers(first)
                    ),
                    (
                        &other.topic,
                        &other.key,
                        &other.value,
                        comparable_headers(other)
                    ),
                    "the records of {id} differ between senders"
                );
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{} delivery violations, e.g.:\n{}",
        violations.len(),
        violations[..violations.len().min(10)].join("\n")
    );
    for (i, p) in phases.iter().enumerate() {
        assert!(
            per_phase[i] > 0,
            "{} (phase #{i}) sent no record: {per_phase:?}",
            p.relay
        );
    }

    // Headers: Debezium's names minus pgoutbox's are exactly its context
    // headers; pgoutbox adds none of its own.
    let names = |pick: &dyn Fn(usize) -> bool| -> BTreeSet<String> {
        records
            .iter()
            .filter(|r| pick(phase_of(r)))
            .flat_map(|r| r.headers.keys().cloned())
            .collect()
    };
    let dbz_names = names(&|p| phases[p].relay == "debezium");
    let pg_names = names(&|p| phases[p].relay == "pgoutbox");
    let dbz_only: BTreeSet<&String> = dbz_names.difference(&pg_names).collect();
    let pg_only: BTreeSet<&String> = pg_names.difference(&dbz_names).collect();
    let context: BTreeSet<&String> = dbz_names
        .iter()
        .filter(|n| n.starts_with(CONTEXT))
        .collect();
    eprintln!("headers: Debezium {dbz_names:?}; pgoutbox {pg_names:?}; Debezium only {dbz_only:?}");
    assert_eq!(
        dbz_only, context,
        "Debezium's extra headers are its context headers, only"
    );
    assert!(
        pg_only.is_empty(),
        "headers only pgoutbox sends: {pg_only:?}"
    );

    // Per-aggregate order within each phase (commit order), and the
    // partitions each relay picks for an aggregate (Kafka Connect's
    // producer: murmur2 of the key; librdkafka's default: CRC32).
    let mut by_key: BTreeMap<(&str, usize), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        by_key
            .entry((r.key.as_str(), phase_of(r)))
            .or_default()
            .push(r);
    }
    for ((key, p), recs) in &mut by_key {
        recs.sort_by_key(|r| (r.partition, r.offset));
        let seqs: Vec<i64> = recs.iter().map(|r| seq_of(r)).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{key}: {} #{p} sent out of commit order: {seqs:?}",
            phases[*p].relay
        );
    }
    let mut partitions: BTreeMap<&str, BTreeMap<&str, BTreeSet<i32>>> = BTreeMap::new();
    for r in &records {
        partitions
            .entry(r.key.as_str())
            .or_default()
            .entry(phases[phase_of(r)].relay)
            .or_default()
            .insert(r.partition);
    }
    let keys = partitions.len();
    let moved = partitions
        .values()
        .filter(|m| {
            m.get("debezium")
                .zip(m.get("pgoutbox"))
                .is_some_and(|(a, b)| a != b)
        })
        .count();
    // Across the handovers, where an aggregate stayed in one partition: a
    // consumer deduplicating on `id` applies the events in the order of
    // their first delivery, and that must be commit order.
    let mut one_partition = 0;
    for (key, _) in partitions
        .iter()
        .filter(|(_, m)| m.values().flatten().collect::<BTreeSet<_>>().len() == 1)
    {
        one_partition += 1;
        let mut recs: Vec<&Record> = records.iter().filter(|r| r.key == *key).collect();
        recs.sort_by_key(|r| r.offset);
        let mut seen = HashSet::new();
        let firsts: Vec<i64> = recs
            .iter()
            .filter(|r| seen.insert(r.header("id")))
            .map(|r| seq_of(r))
            .collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "{key}: first deliveries across the handover out of commit order: {firsts:?}"
        );
    }
    assert_eq!(
        moved, 0,
        "every aggregate stays on the partition Debezium used (the debezium format hashes keys \
         with murmur2, as Kafka Connect's producer does): {partitions:?}"
    );
    assert_eq!(
        one_partition, keys,
        "so per-aggregate order holds across the handover for every aggregate"
    );

    let mut summary = format!(
        "TAKEOVER {scenario}: rows {}, transactions {} ({} rolled back), records {}, missing 0, duplicates {duplicates}",
        rows.len(),
        txs.len(),
        txs.iter().filter(|t| !t.committed).count(),
        records.len(),
    );
    for (i, p) in phases.iter().enumerate() {
        summary.push_str(&format!(
            "; #{i} {} sent {} records in {:.1}s",
            p.relay,
            per_phase[i],
            p.duration.as_secs_f64()
        ));
        if let Some(c) = p.confirmed_at_start {
            let (lo, hi) = duplicate_window[i];
            summary.push_str(&format!(" from confirmed_flush {}", lsn(c)));
            if hi > 0 {
                summary.push_str(&format!(
                    " (its re-sends: commits in ({}, ≤{}], {} bytes of WAL)",
                    lsn(c),
                    lsn(hi),
                    hi - c.min(lo)
                ));
            }
        }
    }
    summary.push_str(&format!(
        "; partitions moved {moved}/{keys} (order across the handover checked for {one_partition}); \
         Debezium-only headers {dbz_only:?}; read back in {:.1}s",
        read_in.as_secs_f64()
    ));
    eprintln!("{summary}");
    summary
}

/// Debezium on its slot under load, stopped `how`, pgoutbox taking over
/// the slot from `pgoutbox import-debezium` + `adopt`; with `rollback`,
/// pgoutbox stopped and Debezium started again on the slot (see the
/// module's documentation).
async fn takeover(name: &str, how: Stop, rollback: bool) {
    let _serial = SERIAL.lock().await;
    if common::debezium::skip_reason().is_some() {
        return;
    }
    let t_all = Instant::now();
    let sc = Scenario::new(name).await;
    let definition = sc.table_definition().await;

    // Phase 0: Debezium.
    let started_in = sc.start_debezium().await;
    eprintln!(
        "Debezium RUNNING and streaming in {:.1}s",
        started_in.as_secs_f64()
    );
    let load = Load::start(&sc.name, Duration::from_millis(3));
    let t_phase = Instant::now();
    wait_records(&sc, PER_PHASE, None, "Debezium to relay events").await;
    let mut phases = vec![Phase {
        relay: "debezium",
        confirmed_at_start: None,
        first_tx: 0,
        records_at_start: 0,
        duration: Duration::ZERO,
    }];
    let stopped_in = sc.stop_debezium(how).await;
    phases[0].duration = t_phase.elapsed();
    let phase1_first_tx = load.begun();
    let (_, confirmed) = sc.slot_state().await.expect("the slot");
    let at_handover = sc.records_sent();
    let wal_at_handover = wal_insert_lsn(&sc.client).await;
    eprintln!(
        "Debezium stopped ({how:?}) in {:.1}s: slot confirmed_flush {}, WAL {}, {} records, {} rows committed",
        stopped_in.as_secs_f64(),
        lsn(confirmed),
        lsn(wal_at_handover),
        at_handover,
        load.committed_rows()
    );

    // Phase 1: pgoutbox, from the connector's own configuration.
    let t_handover = Instant::now();
    let config = sc.import();
    let config_arg = config.to_str().expect("UTF-8 path").to_owned();
    let adopt = run_with_timeout_checked(
        sc.pgoutbox(&["--config", &config_arg, "adopt"]),
        Duration::from_secs(60),
    );
    eprintln!(
        "--- pgoutbox adopt ({}):\n{}{}---",
        adopt.status,
        String::from_utf8_lossy(&adopt.stdout),
        String::from_utf8_lossy(&adopt.stderr)
    );
    assert!(adopt.status.success(), "pgoutbox adopt failed");
    assert_eq!(
        sc.table_definition().await,
        definition,
        "adopt changed the outbox table"
    );
    assert_eq!(
        sc.slot_state().await.map(|(_, c)| c),
        Some(confirmed),
        "adopt moved the slot"
    );
    let mut relay = Relay::spawn(
        sc.pgoutbox(&["--config", &config_arg, "run"]),
        &format!("{name}-pgoutbox"),
    );
    phases.push(Phase {
        relay: "pgoutbox",
        confirmed_at_start: Some(confirmed),
        first_tx: phase1_first_tx,
        records_at_start: at_handover,
        duration: Duration::ZERO,
    });
    let t_phase = Instant::now();
    // Rows committed before pgoutbox started: at least this many records
    // once it caught up (Debezium sent `at_handover` of them).
    let backlog = load.committed_rows() as i64;
    let first_record = wait_records(
        &sc,
        at_handover + 1,
        Some(&mut relay),
        "pgoutbox's first record",
    )
    .await;
    let gap = t_handover.elapsed();
    wait_records(&sc, backlog, Some(&mut relay), "pgoutbox to catch up").await;
    let caught_up = t_phase.elapsed();
    wait_records(
        &sc,
        backlog + PER_PHASE,
        Some(&mut relay),
        "pgoutbox to relay the live load",
    )
    .await;
    eprintln!(
        "pgoutbox: first record {:.2}s after its start, {:.2}s after Debezium stopped (import + adopt + start); \
         the backlog of {} rows relayed {:.2}s after its start",
        first_record.as_secs_f64(),
        gap.as_secs_f64(),
        backlog - at_handover,
        caught_up.as_secs_f64()
    );

    if rollback {
        // Phase 2: back to Debezium, load still on. While pgoutbox owns the
        // slot, PostgreSQL moves the slot's restart_lsn on (at each
        // running-transactions record pgoutbox confirms past: CHECKPOINTs
        // here, every 15 s or checkpoint in production) beyond the commit
        // position Debezium's offsets file still holds.
        let stored = sc.stored_offset();
        let stored_commit = stored["lsn_commit"]
            .as_u64()
            .or(stored["lsn"].as_u64())
            .expect("an LSN in Debezium's offset");
        let mut last_checkpoint = Instant::now() - Duration::from_secs(10);
        wait_for(
            "the slot's restart_lsn to pass Debezium's stored commit",
            DEADLINE,
            || {
                let checkpoint = last_checkpoint.elapsed() >= Duration::from_secs(1);
                if checkpoint {
                    last_checkpoint = Instant::now();
                }
                let sc = &sc;
                async move {
                    if checkpoint {
                        // (Needs superuser or pg_checkpoint; without it the
                        // checkpointer's own snapshots move it, more slowly.)
                        let _ = sc.client.batch_execute("CHECKPOINT").await;
                    }
                    (sc.restart_lsn().await > stored_commit).then_some(())
                }
            },
        )
        .await;
        let status = relay.terminate();
        assert!(status.success(), "pgoutbox exited {status} on SIGTERM");
        phases[1].duration = t_phase.elapsed();
        wait_for("pgoutbox's walsender to exit", DEADLINE, || async {
            matches!(sc.slot_state().await, Some((false, _))).then_some(())
        })
        .await;
        let (_, confirmed) = sc.slot_state().await.expect("the slot");
        let restart = sc.restart_lsn().await;
        let at_rollback = sc.records_sent();
        let first_tx = load.begun();
        eprintln!(
            "pgoutbox stopped: slot confirmed_flush {}, restart_lsn {}; Debezium's offsets file: {stored}; {} records",
            lsn(confirmed),
            lsn(restart),
            at_rollback
        );
        let t_phase = Instant::now();
        // Started as it was, Debezium refuses: its stored position is no
        // longer in the slot (it would re-snapshot under
        // snapshot.mode=when_needed, re-sending the whole table).
        let dir = sc.dir.to_str().expect("UTF-8 path").to_owned();
        let naive = sc.debezium(&["start", &dir], Duration::from_secs(150));
        let said = String::from_utf8_lossy(&naive.stderr);
        let log = sc.debezium_log(400);
        assert!(
            !naive.status.success()
                && log.contains("Last recorded offset is no longer available on the server"),
            "expected Debezium to refuse its stale offset (restart_lsn {} > its lsn_commit {}):\n{said}",
            lsn(restart),
            lsn(stored_commit)
        );
        eprintln!(
            "Debezium started with its own offsets refused, as expected: \"Last recorded offset is no longer available on the server\""
        );
        // The way back: the connector's offset moved to the slot's
        // confirmed position, through Kafka Connect's offsets API.
        sc.reposition_debezium(confirmed, &config).await;
        eprintln!(
            "Debezium RUNNING again (from the slot's position) {:.1}s after pgoutbox stopped",
            t_phase.elapsed().as_secs_f64()
        );
        phases.push(Phase {
            relay: "debezium",
            confirmed_at_start: Some(confirmed),
            first_tx,
            records_at_start: at_rollback,
            duration: Duration::ZERO,
        });
        wait_records(
            &sc,
            load.committed_rows() as i64 + PER_PHASE,
            None,
            "Debezium to relay again",
        )
        .await;
        let txs = load.stop().await;
        phases[2].duration = t_phase.elapsed();
        assert!(
            txs.len() as u64 > phases[2].first_tx,
            "no transaction began after pgoutbox stopped"
        );
        // verify() waits for every row, then Debezium stops cleanly.
        verify(&sc, name, &txs, &phases).await;
        sc.stop_debezium(Stop::Clean).await;
    } else {
        let txs = load.stop().await;
        phases[1].duration = t_phase.elapsed();
        verify(&sc, name, &txs, &phases).await;
        // pgoutbox owns the slot now: it confirms every commit.
        let last = txs.iter().filter(|t| t.committed).map(|t| t.upper).max();
        let last = last.expect("committed transactions");
        wait_for("pgoutbox to confirm the last commit", DEADLINE, || async {
            let (_, confirmed) = sc.slot_state().await.expect("the slot");
            (confirmed >= last).then_some(())
        })
        .await;
        assert!(relay.running(), "{}", relay.log_text());
        let status = relay.terminate();
        assert!(status.success(), "pgoutbox exited {status} on SIGTERM");
    }
    assert_eq!(
        sc.table_definition().await,
        definition,
        "the outbox table was changed"
    );
    eprintln!(
        "{name}: {:.1}s in all (records at each phase start: {:?})",
        t_all.elapsed().as_secs_f64(),
        phases
            .iter()
            .map(|p| p.records_at_start)
            .collect::<Vec<_>>()
    );
}

/// Debezium stopped cleanly (offsets committed, slot confirmed): pgoutbox
/// continues from the slot, nothing lost, the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgoutbox_takes_over_a_cleanly_stopped_debezium_slot_without_gap() {
    takeover("dbz_takeover_clean", Stop::Clean, false).await;
}

/// Debezium SIGKILLed mid-stream: pgoutbox re-sends only what the slot had
/// not confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgoutbox_takes_over_a_sigkilled_debezium_slot_without_gap() {
    takeover("dbz_takeover_kill", Stop::Kill, false).await;
}

/// The way back: pgoutbox stopped, Debezium started again on the slot with
/// its config dir refuses its stale offset once the slot's restart_lsn has
/// moved past it; with the offset moved to the slot's confirmed position
/// (Kafka Connect's offsets API) it delivers every row written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debezium_resumes_the_slot_after_pgoutbox_stops() {
    takeover("dbz_takeover_rollback", Stop::Clean, true).await;
}

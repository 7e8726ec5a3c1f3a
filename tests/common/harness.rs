//! An isolated outbox per test (own schema, publication, slot and topics),
//! the relay as a real child process, and Kafka read back with a consumer.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

use super::services;

/// Connects to the test database.
pub async fn connect() -> Client {
    let (client, conn) = tokio_postgres::connect(&services().database_url, NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// pgoutbox's own connection settings for `url`, as `run` builds them.
pub fn database_settings(
    url: &str,
) -> Result<pgoutbox::database::Settings, pgoutbox::config::ConfigError> {
    let mut config = pgoutbox::config::Config::default();
    config.database.url = pgoutbox::config::DatabaseUrl::new(url);
    pgoutbox::database::settings(&config)
}

/// The least-privilege role every relay started through the harness runs
/// as (created and granted by `pgoutbox migrate --relay-role`, which the
/// harness runs as the admin role of `services().database_url`).
pub const RELAY_ROLE: &str = "pgoutbox_relay";

/// The relay role's password: distinctive, so a leak is found by a plain
/// search of every log and captured output (`PGOUTBOX_TEST_RELAY_PASSWORD`
/// overrides it).
pub fn relay_password() -> String {
    std::env::var("PGOUTBOX_TEST_RELAY_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "relay-Secr3t-9f4c".to_owned())
}

/// Splits a URL into (`scheme://`, userinfo, `@host...`); `None` for a
/// libpq key/value string or a URL without userinfo.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let scheme_end = url.find("://")? + 3;
    let rest = &url[scheme_end..];
    let auth_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let at = rest[..auth_end].rfind('@')?;
    Some((&url[..scheme_end], &rest[..at], &rest[at..]))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `url` (the admin's) with the relay role's name and password instead of
/// the admin's.
pub fn relay_url_of(url: &str) -> String {
    url_as_relay(url, Some(&relay_password()))
}

/// `url` with the relay role's name and `password` (none: no password).
pub fn url_as_relay(url: &str, password: Option<&str>) -> String {
    let userinfo = match password {
        Some(pw) => format!("{RELAY_ROLE}:{}", percent_encode(pw)),
        None => RELAY_ROLE.to_owned(),
    };
    match split_userinfo(url) {
        Some((scheme, _, host)) => format!("{scheme}{userinfo}{host}"),
        None => match url.find("://") {
            Some(i) => format!("{}{userinfo}@{}", &url[..i + 3], &url[i + 3..]),
            None => match password {
                Some(pw) => format!("{url} user={RELAY_ROLE} password='{pw}'"),
                None => format!("{url} user={RELAY_ROLE} password=''"),
            },
        },
    }
}

/// The test database as the relay role.
pub fn relay_database_url() -> String {
    relay_url_of(&services().database_url)
}

/// The test database as the relay role with `password` instead of the
/// right one (none: no password in the URL).
pub fn relay_database_url_with(password: Option<&str>) -> String {
    url_as_relay(&services().database_url, password)
}

/// A `DATABASE_URL` a test set for a relay: if it carries the admin's
/// credentials (the test only added options or changed the port), the relay
/// role's instead; any other URL (another user, a wrong password, another
/// server) unchanged.
fn as_relay(url: &str) -> String {
    match (
        split_userinfo(url),
        split_userinfo(&services().database_url),
    ) {
        (Some((_, info, _)), Some((_, admin, _))) if info == admin => relay_url_of(url),
        _ => url.to_owned(),
    }
}

/// The secrets no log or output may contain: the relay role's password, and
/// the admin's when it is distinctive (not the user or database name, at
/// least 8 characters).
pub fn secrets() -> Vec<String> {
    let mut out = vec![relay_password()];
    if let Ok(pg) = services().database_url.parse::<tokio_postgres::Config>() {
        if let Some(pw) = pg.get_password() {
            let pw = String::from_utf8_lossy(pw).into_owned();
            let user = pg.get_user().unwrap_or_default();
            let db = pg.get_dbname().unwrap_or_default();
            if pw.len() >= 8 && pw != user && pw != db {
                out.push(pw);
            }
        }
    }
    out
}

/// Panics (unless already panicking) if `text` contains a secret; `what`
/// names where it came from.
pub fn assert_no_secrets(what: &str, text: &str) {
    for secret in secrets() {
        if text.contains(&secret) && !std::thread::panicking() {
            panic!(
                "a password leaked into {what}:\n{}",
                text.replace(&secret, "<<SECRET>>")
            );
        }
    }
}

/// Runs `cmd` to completion, capturing stdout and stderr, and checks both
/// for secrets.
pub fn output_checked(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run pgoutbox");
    assert_output_has_no_secrets(cmd, &out);
    out
}

/// Panics (unless already panicking) if `cmd`'s stdout or stderr contains a
/// secret.
fn assert_output_has_no_secrets(cmd: &Command, out: &Output) {
    assert_no_secrets(
        &format!("the output of {cmd:?}"),
        &format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    );
}

/// Runs `cmd` to completion, capturing stdout and stderr, as
/// `Command::output` does; a `cmd` still running after `timeout` is killed
/// (SIGKILL) and the test fails: a hang is a failure, not a stalled run.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    output_within(&mut cmd, timeout)
}

/// `run_with_timeout`, then checks stdout and stderr for secrets as
/// `output_checked` does.
pub fn run_with_timeout_checked(mut cmd: Command, timeout: Duration) -> Output {
    let out = output_within(&mut cmd, timeout);
    assert_output_has_no_secrets(&cmd, &out);
    out
}

fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgoutbox");
    // Both pipes drained while waiting, so a chatty child cannot block on a
    // full one.
    fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    }
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    // Killed only while not yet waited for, so never a recycled pid.
    let (status, killed) = loop {
        if let Some(status) = child.try_wait().expect("wait pgoutbox") {
            break (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().expect("wait pgoutbox"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output {
        status,
        stdout: stdout.join().expect("read stdout"),
        stderr: stderr.join().expect("read stderr"),
    };
    if out.status.code().is_none() {
        if killed {
            panic!("pgoutbox hung and was killed after {timeout:?}");
        }
        panic!(
            "pgoutbox died of a signal ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The advisory lock [`TestOutbox::hold_marks`] holds.
pub const MARKS_LOCK: i64 = 4343;

/// One test's outbox: schema `<name>`, table `outbox`, publication
/// `<name>_pub`, slot `<name>_slot`, topics under `<name>.`.
pub struct TestOutbox {
    /// The unique name.
    pub name: String,
    /// A client on the test database.
    pub client: Client,
    /// Extra config file lines (TOML) for the relay.
    pub extra_config: String,
    /// Environment overrides for the relay.
    pub env: Vec<(String, String)>,
    /// Prefix of this run's topics: `<name>-<unique>`, so reruns never read
    /// records of an earlier run.
    pub topic_prefix: String,
}

/// At the end of a test its replication slots go (the relays it started are
/// stopped by then, their walsenders a moment later): leftovers would pin
/// WAL and, over a whole suite, use up `max_replication_slots`.
impl Drop for TestOutbox {
    fn drop(&mut self) {
        drop_slots_when_released(
            vec![
                format!("{}_slot", self.name),
                format!("{}_probe", self.name),
            ],
            Duration::from_secs(3),
        );
    }
}

/// Drops `slots` once no walsender holds them (relays just stopped release
/// theirs a moment later), waiting at most `patience`; from a thread of its
/// own, so it works in `Drop` inside or outside a runtime. Leftover slots
/// would pin WAL and, over a whole suite, use up `max_replication_slots`.
pub fn drop_slots_when_released(slots: Vec<String>, patience: Duration) {
    let url = services().database_url.clone();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
            else {
                return;
            };
            tokio::spawn(conn);
            let deadline = Instant::now() + patience;
            loop {
                let left = client
                    .query_one(
                        "WITH gone AS (SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                            WHERE slot_name = ANY($1) AND NOT active) \
                         SELECT (SELECT count(*) FROM gone), \
                                (SELECT count(*) FROM pg_replication_slots WHERE slot_name = ANY($1) AND active)",
                        &[&slots],
                    )
                    .await;
                match left {
                    Ok(row) if row.get::<_, i64>(1) > 0 && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
        });
    })
    .join();
}

impl TestOutbox {
    /// Creates (from scratch) the outbox for `name` and runs `pgoutbox migrate`.
    pub async fn new(name: &str) -> TestOutbox {
        let client = connect().await;
        let slot = format!("{name}_slot");
        // Leftovers of an earlier run of the same test.
        let _ = client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = ANY($1)",
                &[&vec![slot.clone(), format!("{name}_probe")]],
            )
            .await;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; DROP PUBLICATION IF EXISTS {name}_pub; \
                 DELETE FROM public.pgoutbox_migrations WHERE target LIKE '{name}.%'"
            ))
            .await
            .or_else(|_| {
                // pgoutbox_migrations may not exist yet on a fresh cluster.
                Ok::<(), tokio_postgres::Error>(())
            })
            .unwrap();
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let outbox = TestOutbox {
            name: name.to_owned(),
            client,
            extra_config: String::new(),
            env: vec![],
            topic_prefix: format!("{name}-{unique}"),
        };
        // As the admin; creates (once) and grants the relay's role.
        let out = output_checked(&mut outbox.command_with_args(&["migrate"]));
        assert!(
            out.status.success(),
            "pgoutbox migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outbox
    }

    /// The replication slot name.
    pub fn slot(&self) -> String {
        format!("{}_slot", self.name)
    }

    /// The topic for `aggregate_type` under the default test template
    /// `<prefix>.{aggregate_type}`.
    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.topic_prefix)
    }

    /// A `pgoutbox` command configured for this outbox, connecting as the
    /// relay's least-privilege role ([`RELAY_ROLE`]): for `run`.
    pub fn command(&self) -> Command {
        self.command_as(true)
    }

    /// A `pgoutbox` command connecting as the admin role (for `migrate`,
    /// `dle` and anything else an operator runs).
    pub fn admin_command(&self) -> Command {
        self.command_as(false)
    }

    fn command_as(&self, relay: bool) -> Command {
        let s = services();
        let database_url = if relay {
            relay_url_of(&s.database_url)
        } else {
            s.database_url.clone()
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgoutbox"));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let config = dir.join(format!("{}.toml", self.name));
        // Written aside and renamed into place: a relay starting at this
        // moment reads the old file or the new one, never a truncated one.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let staged = dir.join(format!("{}.toml.{n}.tmp", self.name));
        std::fs::write(&staged, &self.extra_config).expect("write relay config");
        std::fs::rename(&staged, &config).expect("move relay config into place");
        cmd.arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &database_url)
            .env("KAFKA_BROKERS", &s.kafka_brokers)
            .env("OUTBOX_SCHEMA", &self.name)
            .env("OUTBOX_SLOT", self.slot())
            .env("OUTBOX_MESSAGE_PREFIX", &self.name)
            .env("OUTBOX_PUBLICATION", format!("{}_pub", self.name))
            .env(
                "OUTBOX_TOPIC",
                format!("{}.{{aggregate_type}}", self.topic_prefix),
            )
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            // Tests run many relays at once: no metrics endpoint unless a
            // test gives its relay a port of its own (OUTBOX_METRICS_LISTEN
            // in `env`).
            .env("OUTBOX_METRICS_LISTEN", "off");
        for (k, v) in &self.env {
            if relay && k == "DATABASE_URL" {
                cmd.env(k, as_relay(v));
            } else {
                cmd.env(k, v);
            }
        }
        cmd
    }

    /// Starts `pgoutbox run`, logging to a file under the target dir.
    pub fn start_relay(&self) -> Relay {
        Relay::spawn(self.command_with_args(&["run"]), &self.name)
    }

    /// Runs `pgoutbox <args>` to completion (output scanned for secrets)
    /// and panics with its stderr unless it succeeded.
    pub fn run_ok(&self, args: &[&str]) -> Output {
        let out = output_checked(&mut self.command_with_args(args));
        assert!(
            out.status.success(),
            "pgoutbox {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Migrates another outbox table, `table`, into the test's schema and
    /// publication (several outbox tables on one publication).
    pub fn migrate_table(&self, table: &str) {
        let mut cmd = self.command_with_args(&["migrate"]);
        cmd.env("OUTBOX_TABLE", table);
        let out = output_checked(&mut cmd);
        assert!(
            out.status.success(),
            "pgoutbox migrate of {table} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A `pgoutbox` command with these arguments. `migrate` and `dle` run
    /// as the admin role, `migrate` with `--relay-role` (so every table a
    /// test migrates is granted to the relay's role); anything else (`run`)
    /// as the relay's role.
    pub fn command_with_args(&self, args: &[&str]) -> Command {
        match args.first().copied() {
            Some("migrate") => {
                let mut cmd = self.admin_command();
                cmd.args(args);
                if !args.contains(&"--relay-role") {
                    cmd.args(["--relay-role", RELAY_ROLE])
                        .env("PGOUTBOX_RELAY_PASSWORD", relay_password());
                }
                cmd
            }
            Some("dle") => {
                let mut cmd = self.admin_command();
                cmd.args(args);
                cmd
            }
            _ => {
                let mut cmd = self.command();
                cmd.args(args);
                cmd
            }
        }
    }

    /// Publishes one event through `outbox_publish`; returns its tracking id.
    pub async fn publish(
        &self,
        aggregate_type: &str,
        aggregate_id: uuid::Uuid,
        event_type: &str,
        payload: &serde_json::Value,
    ) -> uuid::Uuid {
        let row = self
            .client
            .query_one(
                &format!("SELECT {}.outbox_publish($1, $2, $3, $4)", self.name),
                &[&aggregate_type, &aggregate_id, &event_type, payload],
            )
            .await
            .expect("outbox_publish");
        row.get(0)
    }

    /// Rows the test schema's delivery journal lists (delivered by CDC, not
    /// folded into `COMPLETED` yet).
    pub async fn journaled_rows(&self) -> i64 {
        let sql = format!(
            "SELECT coalesce(sum(cardinality(ids)), 0)::bigint FROM {}.pgoutbox_delivered",
            self.name
        );
        self.client.query_one(&sql, &[]).await.unwrap().get(0)
    }

    /// Counts rows by status.
    pub async fn statuses(&self) -> HashMap<String, i64> {
        self.client
            .query(
                &format!(
                    "SELECT status, count(*) FROM {}.outbox GROUP BY 1",
                    self.name
                ),
                &[],
            )
            .await
            .expect("count statuses")
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// The slot's confirmed_flush_lsn (0 when the slot does not exist).
    pub async fn confirmed_flush(&self) -> u64 {
        let row = self
            .client
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await
            .expect("read slot");
        row.and_then(|r| r.get::<_, Option<i64>>(0)).unwrap_or(0) as u64
    }

    /// Holds every status update of `tables` (of the test's schema) and
    /// every entry of the schema's delivery journal (how CDC records
    /// deliveries by default): a trigger waits on an advisory lock the
    /// returned client holds, until it unlocks ([`MARKS_LOCK`]) or drops.
    pub async fn hold_marks(&self, tables: &[&str]) -> tokio_postgres::Client {
        let s = &self.name;
        let mut sql = format!(
            "CREATE OR REPLACE FUNCTION {s}.hold_marks() RETURNS trigger LANGUAGE plpgsql AS $$ \
               BEGIN PERFORM pg_advisory_xact_lock_shared({MARKS_LOCK}); RETURN NEW; END $$; \
             CREATE TRIGGER hold_marks BEFORE INSERT ON {s}.pgoutbox_delivered \
               FOR EACH ROW EXECUTE FUNCTION {s}.hold_marks();"
        );
        for t in tables {
            sql.push_str(&format!(
                " CREATE TRIGGER hold_marks BEFORE UPDATE ON {s}.{t} FOR EACH ROW EXECUTE FUNCTION {s}.hold_marks();"
            ));
        }
        self.client.batch_execute(&sql).await.unwrap();
        let holder = connect().await;
        holder
            .execute(&format!("SELECT pg_advisory_lock({MARKS_LOCK})"), &[])
            .await
            .unwrap();
        holder
    }

    /// Drops the test's slot (the relay must be stopped).
    pub async fn drop_slot(&self) {
        let _ = self
            .client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot()],
            )
            .await;
    }
}

/// A running relay process.
pub struct Relay {
    child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Relay {
    /// Spawns `cmd`, its stderr (and stdout) going to a log file named
    /// after `name`.
    pub fn spawn(mut cmd: Command, name: &str) -> Relay {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let log = dir.join(format!("{name}-{n}.log"));
        let file = std::fs::File::create(&log).expect("create relay log");
        // stdout too, so it is searched for secrets with the log.
        let stdout = file.try_clone().expect("clone relay log handle");
        let child = cmd
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .expect("spawn pgoutbox");
        Relay { child, log }
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no chance to flush or confirm.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status (with a deadline).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait relay") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit after SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the relay to exit by itself (with a deadline).
    pub fn wait_exit(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait relay") {
                return (status, self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

/// Every relay's log is searched for secrets when it ends (killed,
/// terminated, waited for or dropped), unless the test already failed.
impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what the relay said (CI keeps no files).
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- the last {} lines of the relay log {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
        assert_no_secrets(
            &format!("the relay log {}", self.log.display()),
            &self.log_text(),
        );
    }
}

/// A record read back from Kafka.
#[derive(Clone, Debug)]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key as text.
    pub key: String,
    /// Value as text.
    pub value: String,
    /// Headers.
    pub headers: HashMap<String, String>,
}

impl Record {
    /// A header's value ("" if missing).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Reads every record of `topics` from the beginning, until `done(records)`
/// holds and every partition is read to its high watermark, or panics after
/// `timeout`.
pub fn read_topics(
    topics: &[String],
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    read_topics_as(topics, timeout, None, done)
}

/// Which records a reader of transactional topics sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// Only records of committed Kafka transactions (what exactly-once
    /// consumers set).
    ReadCommitted,
    /// Every record written, aborted transactions' too.
    ReadUncommitted,
}

/// [`read_topics`] with an explicit `isolation.level`: "read to the end"
/// then means every partition reported its end (for `read_committed` the
/// last stable offset; transaction markers take offsets, so the high
/// watermark is never reached by records).
pub fn read_topics_as(
    topics: &[String],
    timeout: Duration,
    isolation: Option<Isolation>,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    read_topics_from(&services().kafka_brokers, topics, timeout, isolation, done)
}

/// [`read_topics_as`] from the brokers at `brokers` (another cluster than
/// the test services', e.g. a broker in a container).
pub fn read_topics_from(
    brokers: &str,
    topics: &[String],
    timeout: Duration,
    isolation: Option<Isolation>,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let mut config = ClientConfig::new();
    if let Some(level) = isolation {
        config.set("enable.partition.eof", "true").set(
            "isolation.level",
            match level {
                Isolation::ReadCommitted => "read_committed",
                Isolation::ReadUncommitted => "read_uncommitted",
            },
        );
    }
    let mut at_end: std::collections::HashSet<(String, i32)> = Default::default();
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", brokers)
        .set("group.id", "pgoutbox-tests")
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        // A partition whose start offset cannot be read yet (a topic just
        // created) must not be skipped to its end: librdkafka's default
        // reset is "latest".
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("create consumer");
    let deadline = Instant::now() + timeout;
    let mut assigned: HashMap<(String, i32), ()> = HashMap::new();
    let mut records: Vec<Record> = Vec::new();
    loop {
        // (Re)assign whatever partitions exist now.
        let mut tpl = TopicPartitionList::new();
        let mut changed = false;
        for t in topics {
            if let Ok(md) = consumer.fetch_metadata(Some(t), Duration::from_secs(5)) {
                for topic in md.topics() {
                    if topic.error().is_some() {
                        continue;
                    }
                    for p in topic.partitions() {
                        if assigned.insert((t.clone(), p.id()), ()).is_none() {
                            changed = true;
                        }
                    }
                }
            }
        }
        if changed {
            for (t, p) in assigned.keys() {
                tpl.add_partition_offset(t, *p, Offset::Beginning)
                    .expect("add partition");
            }
            records.clear();
            at_end.clear();
            consumer.assign(&tpl).expect("assign");
        }
        let poll_until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < poll_until {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    at_end.remove(&(m.topic().to_owned(), m.partition()));
                    let mut headers = HashMap::new();
                    if let Some(h) = m.headers() {
                        for i in 0..h.count() {
                            let hd = h.get(i);
                            headers.insert(
                                hd.key.to_owned(),
                                String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                            );
                        }
                    }
                    records.push(Record {
                        topic: m.topic().to_owned(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        value: String::from_utf8_lossy(m.payload().unwrap_or_default())
                            .into_owned(),
                        headers,
                    });
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    // The event names the partition only; each test's topics
                    // each have one writer, so mark every topic's.
                    for t in topics {
                        at_end.insert((t.clone(), p));
                    }
                }
                Some(Err(e)) => eprintln!("consumer error: {e}"),
                None => {}
            }
        }
        if !assigned.is_empty() && done(&records) && isolation.is_some() {
            if assigned.keys().all(|k| at_end.contains(k)) {
                return records;
            }
        } else if !assigned.is_empty() && done(&records) {
            // Drain to the high watermarks so duplicates are counted too.
            let all_read = assigned.keys().all(|(t, p)| {
                let high = consumer
                    .fetch_watermarks(t, *p, Duration::from_secs(5))
                    .map(|(_, h)| h)
                    .unwrap_or(0);
                let max_seen = records
                    .iter()
                    .filter(|r| &r.topic == t && r.partition == *p)
                    .map(|r| r.offset + 1)
                    .max()
                    .unwrap_or(0);
                max_seen >= high
            });
            if all_read {
                return records;
            }
        }
        if Instant::now() >= deadline {
            // Per partition: records read / high watermark.
            let mut seen: Vec<String> = assigned
                .keys()
                .map(|(t, p)| {
                    let n = records
                        .iter()
                        .filter(|r| &r.topic == t && r.partition == *p)
                        .count();
                    let high = consumer
                        .fetch_watermarks(t, *p, Duration::from_secs(5))
                        .map_or(-1, |(_, h)| h);
                    format!("{t}/{p}: {n}/{high}")
                })
                .collect();
            seen.sort();
            panic!(
                "timed out after {timeout:?} reading {topics:?}: {} records so far ({})",
                records.len(),
                seen.join(", ")
            );
        }
    }
}

/// Reads `topics` until every id in `expected` was seen (by the
/// `tracking_id` header).
pub async fn read_until_all(
    topics: Vec<String>,
    expected: Vec<uuid::Uuid>,
    timeout: Duration,
) -> Vec<Record> {
    read_until_all_as(topics, expected, timeout, None).await
}

/// [`read_until_all`] with an explicit isolation level (see
/// [`read_topics_as`]).
pub async fn read_until_all_as(
    topics: Vec<String>,
    expected: Vec<uuid::Uuid>,
    timeout: Duration,
    isolation: Option<Isolation>,
) -> Vec<Record> {
    tokio::task::spawn_blocking(move || {
        let want: std::collections::HashSet<String> =
            expected.iter().map(|u| u.to_string()).collect();
        read_topics_as(&topics, timeout, isolation, |recs| {
            let seen: std::collections::HashSet<&str> =
                recs.iter().map(|r| r.header("tracking_id")).collect();
            want.iter().all(|w| seen.contains(w.as_str()))
        })
    })
    .await
    .expect("consumer task")
}

/// Exact commit end LSNs by transaction id, read from a probe slot on the
/// test's publication (decoded with pgoutbox's own decoder).
pub struct CommitLog {
    slot: String,
    publication: String,
}

impl CommitLog {
    /// Creates the probe slot; only transactions committed after this are seen.
    pub async fn start(outbox: &TestOutbox) -> CommitLog {
        let slot = format!("{}_probe", outbox.name);
        outbox
            .client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
            .expect("create probe slot");
        CommitLog {
            slot,
            publication: format!("{}_pub", outbox.name),
        }
    }

    /// xid -> commit end LSN for every transaction seen so far.
    pub async fn commit_ends(&self, client: &Client) -> HashMap<u32, u64> {
        let rows = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
                 'proto_version', '1', 'publication_names', $2)",
                &[&self.slot, &self.publication],
            )
            .await
            .expect("peek probe slot");
        let mut decoder = pgoutbox::pgoutput::Decoder::new(1);
        let mut xid = 0u32;
        let mut out = HashMap::new();
        for r in rows {
            let data: Vec<u8> = r.get(0);
            match decoder
                .decode(bytes::Bytes::from(data))
                .expect("decode probe message")
            {
                pgoutbox::pgoutput::LogicalMessage::Begin(b) => xid = b.xid,
                pgoutbox::pgoutput::LogicalMessage::Commit(c) => {
                    out.insert(xid, c.end_lsn.0);
                }
                _ => {}
            }
        }
        out
    }

    /// Drops the probe slot.
    pub async fn stop(self, client: &Client) {
        let _ = client
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
            .await;
    }
}

/// Creates `topic` with 4 partitions, for a relay that may not auto-create
/// it (`allow.auto.create.topics = false`).
pub async fn create_topic(topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka_brokers)
        .create()
        .expect("admin client");
    let new = NewTopic::new(topic, 4, TopicReplication::Fixed(1));
    for r in admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic")
    {
        r.expect("topic created");
    }
}

/// Sum of the high watermarks of every partition of `topic` (0 when it does
/// not exist yet): how many records it holds.
pub fn topic_record_count(topic: &str) -> i64 {
    watermarks(topic)
        .values()
        .map(|(low, high)| high - low)
        .sum()
}

/// Per partition of `topic`: (low, high) watermarks (empty when the topic
/// does not exist yet).
pub fn watermarks(topic: &str) -> HashMap<i32, (i64, i64)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &services().kafka_brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create consumer");
    let mut out = HashMap::new();
    let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return out;
    };
    for t in md.topics() {
        if t.error().is_some() {
            continue;
        }
        for p in t.partitions() {
            if let Ok(w) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5)) {
                out.insert(p.id(), w);
            }
        }
    }
    out
}

/// How many times each tracking id was delivered.
pub fn delivery_counts(records: &[Record]) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in records {
        *counts
            .entry(r.header("tracking_id").to_owned())
            .or_default() += 1;
    }
    counts
}

/// How many of `expected` were never delivered.
pub fn missing(expected: &[uuid::Uuid], counts: &HashMap<String, usize>) -> usize {
    expected
        .iter()
        .filter(|id| !counts.contains_key(&id.to_string()))
        .count()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// GET `path` from `addr`: (status, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::other("connect timed out"))??;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("read timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// A loopback address with a port nobody listens on right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local address").to_string()
}

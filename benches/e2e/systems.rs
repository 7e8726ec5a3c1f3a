//! The systems under test and how each is started, watched and stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::machine::{usage_of, Usage};
use crate::outbox::{BoxError, PUBLICATION, SCHEMA};

/// A system of the comparison, named as in results.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum System {
    /// pg_recvlogical with pgoutput into /dev/null: the decode ceiling.
    #[value(name = "pg_recvlogical")]
    PgRecvlogical,
    /// pgoutbox CDC, marking rows after Kafka acks (the default: a delivery
    /// journal entry per batch, folded into `COMPLETED` when idle).
    #[value(name = "pgoutbox-cdc")]
    PgoutboxCdc,
    /// pgoutbox CDC marking every row `COMPLETED` with an update before the
    /// slot passes it (`OUTBOX_MARK_WITH=update`, the default until the
    /// delivery journal).
    #[value(name = "pgoutbox-cdc-update")]
    PgoutboxCdcUpdate,
    /// pgoutbox CDC with `mark_completed = false`.
    #[value(name = "pgoutbox-cdc-nomark")]
    PgoutboxCdcNomark,
    /// pgoutbox CDC like for like with Debezium: not marking, records in
    /// the `debezium` format with the EventRouter options scripts/debezium
    /// gives Debezium.
    #[value(name = "pgoutbox-cdc-dbzfmt")]
    PgoutboxCdcDbzfmt,
    /// pgoutbox poll mode, one worker.
    #[value(name = "pgoutbox-poll-1")]
    PgoutboxPoll1,
    /// pgoutbox poll mode, four workers.
    #[value(name = "pgoutbox-poll-4")]
    PgoutboxPoll4,
    /// Kafka Connect standalone + Debezium's PostgreSQL connector + the
    /// outbox EventRouter (scripts/debezium).
    #[value(name = "debezium")]
    Debezium,
    /// pgoutbox CDC with exactly-once delivery (`OUTBOX_DELIVERY=exactly-once`:
    /// Kafka transactions with a progress record), marking rows, every other
    /// setting at its default (a transaction every 100 ms or 10,000 events).
    #[value(name = "pgoutbox-cdc-eos")]
    PgoutboxCdcEos,
    /// The same with `KAFKA_TRANSACTION_INTERVAL_MS=10`.
    #[value(name = "pgoutbox-cdc-eos-10ms")]
    PgoutboxCdcEos10,
    /// The same with `KAFKA_TRANSACTION_INTERVAL_MS=25`.
    #[value(name = "pgoutbox-cdc-eos-25ms")]
    PgoutboxCdcEos25,
    /// The same with `KAFKA_TRANSACTION_INTERVAL_MS=50`.
    #[value(name = "pgoutbox-cdc-eos-50ms")]
    PgoutboxCdcEos50,
    /// Debezium's exactly-once source mode: a Kafka Connect *distributed*
    /// worker (one node, its config/offset/status topics made for the run)
    /// with `exactly.once.source.support=enabled`, the connector of
    /// `debezium` with `exactly.once.support=required` (a Kafka transaction
    /// per poll batch, `transaction.boundary=poll`). Started by the harness
    /// itself from the jars of `scripts/debezium install` (scripts/debezium
    /// runs only the standalone worker, which has no exactly-once mode).
    #[value(name = "debezium-eos")]
    DebeziumEos,
}

impl System {
    /// Every system, in the order they are measured.
    pub const ALL: [System; 13] = [
        System::PgRecvlogical,
        System::PgoutboxCdcNomark,
        System::Debezium,
        System::DebeziumEos,
        System::PgoutboxCdcDbzfmt,
        System::PgoutboxCdc,
        System::PgoutboxCdcUpdate,
        System::PgoutboxCdcEos,
        System::PgoutboxCdcEos10,
        System::PgoutboxCdcEos25,
        System::PgoutboxCdcEos50,
        System::PgoutboxPoll1,
        System::PgoutboxPoll4,
    ];

    /// The name used in results.json.
    pub fn name(self) -> &'static str {
        match self {
            System::PgRecvlogical => "pg_recvlogical",
            System::PgoutboxCdc => "pgoutbox-cdc",
            System::PgoutboxCdcUpdate => "pgoutbox-cdc-update",
            System::PgoutboxCdcNomark => "pgoutbox-cdc-nomark",
            System::PgoutboxCdcDbzfmt => "pgoutbox-cdc-dbzfmt",
            System::PgoutboxPoll1 => "pgoutbox-poll-1",
            System::PgoutboxPoll4 => "pgoutbox-poll-4",
            System::Debezium => "debezium",
            System::PgoutboxCdcEos => "pgoutbox-cdc-eos",
            System::PgoutboxCdcEos10 => "pgoutbox-cdc-eos-10ms",
            System::PgoutboxCdcEos25 => "pgoutbox-cdc-eos-25ms",
            System::PgoutboxCdcEos50 => "pgoutbox-cdc-eos-50ms",
            System::DebeziumEos => "debezium-eos",
        }
    }

    /// Reads a replication slot (so it needs one made before its backlog).
    pub fn streams(self) -> bool {
        !matches!(self, System::PgoutboxPoll1 | System::PgoutboxPoll4)
    }

    /// Delivers to Kafka (pg_recvlogical decodes into /dev/null).
    pub fn delivers(self) -> bool {
        self != System::PgRecvlogical
    }

    /// Writes in Kafka transactions: its records are visible to a
    /// `read_committed` consumer only once their transaction commits, and
    /// transaction markers take offsets of the topic (so its end offsets
    /// are not a count of records).
    pub fn transactional(self) -> bool {
        self.eos_interval_ms().is_some() || self == System::DebeziumEos
    }

    /// pgoutbox with exactly-once delivery: `Some(KAFKA_TRANSACTION_INTERVAL_MS)`
    /// (`Some(None)`: the relay's default).
    fn eos_interval_ms(self) -> Option<Option<u32>> {
        match self {
            System::PgoutboxCdcEos => Some(None),
            System::PgoutboxCdcEos10 => Some(Some(10)),
            System::PgoutboxCdcEos25 => Some(Some(25)),
            System::PgoutboxCdcEos50 => Some(Some(50)),
            _ => None,
        }
    }

    /// A streaming system that marks rows `COMPLETED`: its updates add WAL
    /// (and rows already marked change its own work), so each drains a
    /// backlog no other marking system touched.
    pub fn marks(self) -> bool {
        matches!(self, System::PgoutboxCdc | System::PgoutboxCdcUpdate)
            || self.eos_interval_ms().is_some()
    }

    /// The Kafka Connect worker is a JVM the harness looks up (scripts/debezium).
    fn via_script(self) -> bool {
        self == System::Debezium
    }
}

/// Kafka Connect's REST port for `debezium-eos` (scripts/debezium's
/// standalone worker uses 18083).
const DEBEZIUM_EOS_REST_PORT: u16 = 18084;

/// The `debezium` record format with the EventRouter options
/// scripts/debezium gives Debezium (routing every record to `topic`).
fn debezium_format_config(topic: &str) -> String {
    format!(
        "[kafka]\nformat = \"debezium\"\n\n[kafka.debezium]\nconverter = \"string\"\n\
         \"table.field.event.id\" = \"tracking_id\"\n\"table.field.event.key\" = \"aggregate_id\"\n\
         \"table.field.event.payload\" = \"payload\"\n\"route.by.field\" = \"aggregate_type\"\n\
         \"route.topic.replacement\" = \"{topic}\"\n\
         \"table.fields.additional.placement\" = \"tracking_id:header,aggregate_type:header,aggregate_id:header,event_type:header,created_at:header\"\n"
    )
}

/// Where the programs and their logs are.
pub struct Setup {
    /// The pgoutbox binary under test (a copy, so a rebuild cannot swap it).
    pub relay_bin: PathBuf,
    /// `--relay-env`: set for every pgoutbox system after the harness's own.
    pub relay_env: Vec<(String, String)>,
    /// `pg_recvlogical` of the server's major version.
    pub recvlogical: PathBuf,
    /// `scripts/debezium`.
    pub debezium: PathBuf,
    /// Logs of every run.
    pub logs: PathBuf,
    /// Debezium config dirs (one fresh one per run: no stored offsets).
    pub debezium_dirs: PathBuf,
    /// The services.
    pub db_url: String,
    /// The services.
    pub brokers: String,
}

/// A running system.
pub struct Running {
    system: System,
    /// When it was started: the start of every measured interval.
    pub started: Instant,
    child: Child,
    /// The pid whose CPU and memory are the system's (the JVM for Debezium).
    pid: Option<u32>,
    log: PathBuf,
    /// debezium-eos: the connector's name (its state is checked through
    /// the worker's REST API).
    connector: Option<String>,
    /// pgoutbox: the address of its `/metrics`.
    pub metrics: Option<String>,
}

/// The progress topic of an exactly-once run delivering to `topic`.
pub fn progress_topic(topic: &str) -> String {
    format!("{topic}-progress")
}

/// The topics a run of `system` delivering to `topic` has besides it: the
/// progress topic (pgoutbox exactly-once), Kafka Connect's (debezium-eos).
pub fn side_topics(system: System, topic: &str) -> Vec<String> {
    let suffixes: &[&str] = match system {
        System::DebeziumEos => &["-connect-configs", "-connect-offsets", "-connect-status"],
        s if s.eos_interval_ms().is_some() => &["-progress"],
        _ => &[],
    };
    suffixes.iter().map(|s| format!("{topic}{s}")).collect()
}

fn debezium_eos_connector(label: &str) -> String {
    format!("bench-{label}")
}

/// What the Debezium connector needs of DATABASE_URL.
struct UrlParts {
    host: String,
    port: String,
    user: String,
    password: String,
    dbname: String,
}

/// postgres://user:password@host:port/dbname[?…], as scripts/debezium reads it.
fn url_parts(url: &str) -> Result<UrlParts, BoxError> {
    let url = url.split('?').next().unwrap_or(url);
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or("DATABASE_URL is not a postgres:// URL")?;
    let (userinfo, rest) = rest.split_once('@').ok_or("DATABASE_URL has no user")?;
    let (hostport, dbname) = rest.split_once('/').unwrap_or((rest, "postgres"));
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "5432"));
    Ok(UrlParts {
        host: host.into(),
        port: port.into(),
        user: user.into(),
        password: password.into(),
        dbname: if dbname.is_empty() {
            "postgres"
        } else {
            dbname
        }
        .into(),
    })
}

impl Setup {
    fn log_file(&self, label: &str) -> Result<(PathBuf, std::fs::File), BoxError> {
        std::fs::create_dir_all(&self.logs)?;
        let path = self.logs.join(format!("{label}.log"));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, file))
    }

    /// Starts `system`, streaming from `slot` (CDC) and delivering to `topic`.
    /// `label` names its log file. For Debezium the clock starts before
    /// `scripts/debezium start` (JVM and Connect start-up are part of the
    /// time, as a relay's start-up is).
    pub fn start(
        &self,
        system: System,
        slot: &str,
        topic: &str,
        label: &str,
    ) -> Result<Running, BoxError> {
        let (log, file) = self.log_file(label)?;
        let started = Instant::now();
        let mut metrics = None;
        let child = match system {
            System::PgRecvlogical => return Err("pg_recvlogical runs through recvlogical()".into()),
            System::DebeziumEos => self.start_debezium_eos(slot, topic, label, file)?,
            System::Debezium => {
                let dir = self.debezium_dirs.join(label);
                let _ = std::fs::remove_dir_all(&dir);
                Command::new(&self.debezium)
                    .arg("start")
                    .arg(&dir)
                    .env("DATABASE_URL", &self.db_url)
                    .env("KAFKA_BROKERS", &self.brokers)
                    .env("DBZ_SCHEMA", SCHEMA)
                    .env("DBZ_PUBLICATION", PUBLICATION)
                    .env("DBZ_SLOT", slot)
                    .env("DBZ_ROUTE_REPLACEMENT", topic)
                    .env("DBZ_CONNECTOR_NAME", format!("bench-{label}"))
                    .env("DBZ_TIMEOUT", "300")
                    .stdin(Stdio::null())
                    .stdout(file.try_clone()?)
                    .stderr(file)
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", self.debezium.display()))?
            }
            _ => {
                let (mode, mark, workers) = match system {
                    System::PgoutboxCdc
                    | System::PgoutboxCdcUpdate
                    | System::PgoutboxCdcEos
                    | System::PgoutboxCdcEos10
                    | System::PgoutboxCdcEos25
                    | System::PgoutboxCdcEos50 => ("cdc", "true", "1"),
                    System::PgoutboxCdcNomark | System::PgoutboxCdcDbzfmt => ("cdc", "false", "1"),
                    System::PgoutboxPoll1 => ("poll", "true", "1"),
                    _ => ("poll", "true", "4"),
                };
                // Defaults of config/pgoutbox.toml for everything else;
                // nothing of the caller's OUTBOX_* / KAFKA_* leaks in.
                let mut cmd = Command::new(&self.relay_bin);
                metrics = crate::relay_metrics::free_addr();
                if system == System::PgoutboxCdcDbzfmt {
                    let config = self.logs.join(format!("{label}.toml"));
                    std::fs::write(&config, debezium_format_config(topic))?;
                    cmd.arg("--config").arg(config);
                }
                cmd.args(["run", "--mode", mode])
                    .env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .env("DATABASE_URL", &self.db_url)
                    .env("KAFKA_BROKERS", &self.brokers)
                    .env("OUTBOX_SCHEMA", SCHEMA)
                    .env("OUTBOX_PUBLICATION", PUBLICATION)
                    .env("OUTBOX_SLOT", slot)
                    .env("OUTBOX_TOPIC", topic)
                    .env("OUTBOX_MARK_COMPLETED", mark)
                    .env("OUTBOX_CONCURRENCY", workers)
                    .env(
                        "OUTBOX_METRICS_LISTEN",
                        metrics.clone().unwrap_or_else(|| "off".into()),
                    )
                    .env("NO_COLOR", "1");
                if system == System::PgoutboxCdcUpdate {
                    cmd.env("OUTBOX_MARK_WITH", "update");
                }
                if let Some(interval) = system.eos_interval_ms() {
                    // A progress topic of the run's own (made by the
                    // harness, compacted): no record of an earlier run.
                    cmd.env("OUTBOX_DELIVERY", "exactly-once")
                        .env("KAFKA_PROGRESS_TOPIC", progress_topic(topic));
                    if let Some(ms) = interval {
                        cmd.env("KAFKA_TRANSACTION_INTERVAL_MS", ms.to_string());
                    }
                }
                cmd.envs(self.relay_env.iter().map(|(k, v)| (k, v)));
                cmd.stdin(Stdio::null())
                    .stdout(file.try_clone()?)
                    .stderr(file)
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", self.relay_bin.display()))?
            }
        };
        let pid = (!system.via_script()).then(|| child.id());
        Ok(Running {
            system,
            started,
            child,
            pid,
            log,
            connector: (system == System::DebeziumEos).then(|| debezium_eos_connector(label)),
            metrics,
        })
    }

    /// Starts a Kafka Connect distributed worker with exactly-once source
    /// support (its config, offset and status topics named after `topic`,
    /// so every run starts with no stored offsets and they go with the run's
    /// topics), waits for its REST API and submits the Debezium connector
    /// with `exactly.once.support=required`. The JVM options and heap are
    /// scripts/debezium's.
    fn start_debezium_eos(
        &self,
        slot: &str,
        topic: &str,
        label: &str,
        log: std::fs::File,
    ) -> Result<Child, BoxError> {
        let paths = Command::new(&self.debezium)
            .arg("paths")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.debezium.display()))?;
        let paths = String::from_utf8_lossy(&paths.stdout).to_string();
        let path_of = |key: &str| {
            paths
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| format!("scripts/debezium paths printed no {key}"))
        };
        let (libs, plugins) = (path_of("libs:")?, path_of("plugins:")?);
        let dir = self.debezium_dirs.join(label);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Absolute: the worker runs in it and is given paths into it.
        let dir = std::fs::canonicalize(&dir)?;
        let port = DEBEZIUM_EOS_REST_PORT;
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Err(format!(
                "127.0.0.1:{port} is in use (a Kafka Connect worker left running?)"
            )
            .into());
        }
        let worker = dir.join("worker-distributed.properties");
        std::fs::write(
            &worker,
            format!(
                "# Kafka Connect distributed worker (one node) for debezium-eos: exactly-once source support,
                 # the standalone worker's converters and offset flush interval (scripts/debezium).
                 bootstrap.servers={brokers}
group.id={topic}-connect
                 key.converter=org.apache.kafka.connect.storage.StringConverter
                 value.converter=org.apache.kafka.connect.storage.StringConverter
                 config.storage.topic={topic}-connect-configs
offset.storage.topic={topic}-connect-offsets
                 status.storage.topic={topic}-connect-status
config.storage.replication.factor=1
                 offset.storage.replication.factor=1
status.storage.replication.factor=1
                 offset.storage.partitions=1
status.storage.partitions=1
                 offset.flush.interval.ms=100
exactly.once.source.support=enabled
                 plugin.path={plugins}
listeners=http://127.0.0.1:{port}
rest.advertised.host.name=127.0.0.1
                 rest.advertised.port={port}
",
                brokers = self.brokers
            ),
        )?;
        let log4j = dir.join("log4j2.properties");
        std::fs::write(
            &log4j,
            "status = warn
appender.out.type = Console
appender.out.name = out
             appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
             rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
",
        )?;
        let java = std::env::var("PGOUTBOX_JAVA").unwrap_or_else(|_| "java".into());
        let child = Command::new(&java)
            .args([
                "-Xms256M",
                "-Xmx2G",
                "-server",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
            ])
            .args([
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
            ])
            .arg("-Djava.awt.headless=true")
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(format!("{libs}/*"))
            .arg("org.apache.kafka.connect.cli.ConnectDistributed")
            .arg(&worker)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {java}: {e}"))?;
        let connector = self.debezium_eos_connector_config(slot, topic)?;
        let name = debezium_eos_connector(label);
        let mut child = child;
        let submitted = tokio::task::block_in_place(|| {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("the Kafka Connect worker exited ({status})"));
                }
                // PUT /connectors/NAME/config creates the connector; it
                // answers 409 while the worker is still joining its group.
                let out = Command::new("curl")
                    .args([
                        "-sS",
                        "--max-time",
                        "10",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                    ])
                    .args([
                        "-X",
                        "PUT",
                        "-H",
                        "Content-Type: application/json",
                        "--data-binary",
                    ])
                    .arg(&connector)
                    .arg(format!("http://127.0.0.1:{port}/connectors/{name}/config"))
                    .output()
                    .map_err(|e| format!("cannot run curl: {e}"))?;
                let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if code == "201" || code == "200" {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(format!("Kafka Connect did not take the connector within 300 s (last HTTP status {code:?})"));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        if let Err(e) = submitted {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
        Ok(child)
    }

    /// The Debezium connector's settings for `debezium-eos`: those
    /// scripts/debezium gives the standalone worker, plus exactly-once.
    fn debezium_eos_connector_config(&self, slot: &str, topic: &str) -> Result<String, BoxError> {
        let url = url_parts(&self.db_url)?;
        let config = serde_json::json!({
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "database.hostname": url.host,
            "database.port": url.port,
            "database.user": url.user,
            "database.password": url.password,
            "database.dbname": url.dbname,
            "topic.prefix": format!("dbz_{SCHEMA}"),
            "plugin.name": "pgoutput",
            "slot.name": slot,
            "publication.name": PUBLICATION,
            "publication.autocreate.mode": "disabled",
            "table.include.list": format!("{SCHEMA}.outbox"),
            "snapshot.mode": "no_data",
            "tombstones.on.delete": "false",
            "exactly.once.support": "required",
            "transaction.boundary": "poll",
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "transforms.outbox.table.field.event.id": "tracking_id",
            "transforms.outbox.table.field.event.key": "aggregate_id",
            "transforms.outbox.table.field.event.payload": "payload",
            "transforms.outbox.route.by.field": "aggregate_type",
            "transforms.outbox.route.topic.replacement": topic,
            "transforms.outbox.table.fields.additional.placement": "tracking_id:header,aggregate_type:header,aggregate_id:header,event_type:header,created_at:header",
        });
        Ok(config.to_string())
    }

    /// Runs pg_recvlogical on `slot` from its position to `end_lsn` into
    /// /dev/null; returns the wall seconds and its usage (from wait4).
    pub async fn recvlogical(
        &self,
        slot: &str,
        end_lsn: &str,
        label: &str,
    ) -> Result<(f64, Usage), BoxError> {
        let (log, file) = self.log_file(label)?;
        let started = Instant::now();
        let child = Command::new(&self.recvlogical)
            .args([
                "-d",
                &self.db_url,
                "--slot",
                slot,
                "--start",
                "--no-loop",
                "-f",
                "/dev/null",
            ])
            .args([
                "-o",
                "proto_version=1",
                "-o",
                &format!("publication_names={PUBLICATION}"),
            ])
            .arg(format!("--endpos={end_lsn}"))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.recvlogical.display()))?;
        let pid = child.id() as libc::pid_t;
        let (status, rusage) = tokio::task::spawn_blocking(move || {
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value to be overwritten.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: pid is our child, not yet reaped (Child::wait is never called).
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            (if rc == pid { status } else { -1 }, ru)
        })
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        if status != 0 {
            return Err(format!(
                "pg_recvlogical failed (wait status {status}); see {}",
                log.display()
            )
            .into());
        }
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok((
            seconds,
            Usage {
                cpu_s: tv(rusage.ru_utime) + tv(rusage.ru_stime),
                peak_rss_mib: rusage.ru_maxrss as f64 / 1024.0,
            },
        ))
    }
}

impl Running {
    /// Fails when the system died (with the end of its log).
    pub fn check_alive(&mut self, setup: &Setup) -> Result<(), BoxError> {
        if self.system == System::Debezium {
            if self.pid.is_none() {
                self.pid = debezium_pid(setup);
            }
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    return Err(
                        format!("scripts/debezium start failed: {}", tail(&self.log)).into(),
                    );
                }
            }
            return match self.pid {
                Some(pid) if !Path::new(&format!("/proc/{pid}")).exists() => {
                    Err(format!("the Kafka Connect worker exited: {}", tail(&self.log)).into())
                }
                _ => Ok(()),
            };
        }
        if let Some(status) = self.child.try_wait()? {
            return Err(format!(
                "{} exited ({status}): {}",
                self.system.name(),
                tail(&self.log)
            )
            .into());
        }
        if let Some(name) = &self.connector {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "5"])
                .arg(format!(
                    "http://127.0.0.1:{DEBEZIUM_EOS_REST_PORT}/connectors/{name}/status"
                ))
                .stderr(Stdio::null())
                .output()?;
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let failed = |s: &serde_json::Value| s["state"] == "FAILED";
                let task = &v["tasks"][0];
                if failed(&v["connector"]) || failed(task) {
                    let trace = task["trace"]
                        .as_str()
                        .or(v["connector"]["trace"].as_str())
                        .unwrap_or("")
                        .lines()
                        .next()
                        .unwrap_or("");
                    return Err(format!(
                        "the connector failed: {trace} (log {})",
                        self.log.display()
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    /// CPU seconds and peak RSS so far.
    pub fn usage(&self) -> Usage {
        self.pid.and_then(usage_of).unwrap_or_default()
    }

    /// Stops the system (SIGTERM; SIGKILL after 60 s) and returns its usage
    /// just before.
    pub fn stop(mut self, setup: &Setup) -> Usage {
        if self.system.via_script() && self.pid.is_none() {
            self.pid = debezium_pid(setup);
        }
        let usage = self.usage();
        if self.system == System::Debezium {
            let _ = Command::new(&setup.debezium)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
            return usage;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return usage;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        usage
    }
}

fn debezium_pid(setup: &Setup) -> Option<u32> {
    let out = Command::new(&setup.debezium)
        .arg("pid")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The last line of a log that says something, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(empty log)");
    format!("{} (log {})", last.trim(), log.display())
}

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
    /// pgoutbox CDC, marking rows COMPLETED after Kafka acks (the default).
    #[value(name = "pgoutbox-cdc")]
    PgoutboxCdc,
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
}

impl System {
    /// Every system, in the order they are measured.
    pub const ALL: [System; 7] = [
        System::PgRecvlogical,
        System::PgoutboxCdcNomark,
        System::Debezium,
        System::PgoutboxCdcDbzfmt,
        System::PgoutboxCdc,
        System::PgoutboxPoll1,
        System::PgoutboxPoll4,
    ];

    /// The name used in results.json.
    pub fn name(self) -> &'static str {
        match self {
            System::PgRecvlogical => "pg_recvlogical",
            System::PgoutboxCdc => "pgoutbox-cdc",
            System::PgoutboxCdcNomark => "pgoutbox-cdc-nomark",
            System::PgoutboxCdcDbzfmt => "pgoutbox-cdc-dbzfmt",
            System::PgoutboxPoll1 => "pgoutbox-poll-1",
            System::PgoutboxPoll4 => "pgoutbox-poll-4",
            System::Debezium => "debezium",
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
}

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
        let child = match system {
            System::PgRecvlogical => return Err("pg_recvlogical runs through recvlogical()".into()),
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
                    System::PgoutboxCdc => ("cdc", "true", "1"),
                    System::PgoutboxCdcNomark | System::PgoutboxCdcDbzfmt => ("cdc", "false", "1"),
                    System::PgoutboxPoll1 => ("poll", "true", "1"),
                    _ => ("poll", "true", "4"),
                };
                // Defaults of config/pgoutbox.toml for everything else;
                // nothing of the caller's OUTBOX_* / KAFKA_* leaks in.
                let mut cmd = Command::new(&self.relay_bin);
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
                    .env("OUTBOX_METRICS_LISTEN", "off")
                    .env("NO_COLOR", "1")
                    .stdin(Stdio::null())
                    .stdout(file.try_clone()?)
                    .stderr(file)
                    .spawn()
                    .map_err(|e| format!("cannot run {}: {e}", self.relay_bin.display()))?
            }
        };
        let pid = (system != System::Debezium).then(|| child.id());
        Ok(Running {
            system,
            started,
            child,
            pid,
            log,
        })
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
        Ok(())
    }

    /// CPU seconds and peak RSS so far.
    pub fn usage(&self) -> Usage {
        self.pid.and_then(usage_of).unwrap_or_default()
    }

    /// Stops the system (SIGTERM; SIGKILL after 60 s) and returns its usage
    /// just before.
    pub fn stop(mut self, setup: &Setup) -> Usage {
        if self.system == System::Debezium && self.pid.is_none() {
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

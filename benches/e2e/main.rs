//! The side-by-side benchmark: pg_recvlogical (the decode ceiling), pgoutbox
//! CDC (marking rows COMPLETED and not; at least once and exactly once),
//! pgoutbox poll mode (1 and 4 workers) and Debezium (Kafka Connect + the
//! PostgreSQL connector + the outbox EventRouter; at least once and exactly
//! once), in one run, on the same PostgreSQL and Kafka.
//!
//! Run it with `scripts/bench` (which starts the services, installs
//! Debezium, builds the relay and then runs `cargo bench --bench e2e`);
//! BENCHMARKS.md describes the method. Phases:
//!
//! 1. Backlog drain, per shape (1 and 100 events per transaction): the slots
//!    of every streaming system are made first, then N events are written
//!    with no system running, then each system drains the same WAL in turn,
//!    timed from its start until the topic's end offsets hold all N events
//!    (pg_recvlogical: until it reached the backlog's end LSN; a
//!    transactional system: until committed transactions hold all N, see
//!    `finish.rs`). Poll mode, and every system marking rows
//!    but the first, drains a fresh backlog of the same shape each.
//! 2. Live latency: each system runs while events are inserted at a fixed
//!    rate, one per transaction; latency is the broker's log-append time
//!    minus the insert's clock_timestamp — for a transactional system, the
//!    moment a read_committed consumer reading during the run had the event
//!    (every system's run records that too).
//! 3. Each system's CPU seconds and peak RSS from /proc (wait4 for
//!    pg_recvlogical).
//!
//! Results: target/bench/results.{json,md} and results.png.

mod chart;
mod finish;
mod machine;
mod outbox;
mod relay_metrics;
mod results;
mod systems;
mod topics;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::json;
use tokio_postgres::Client;

use machine::CpuTicks;
use outbox::{Backlog, BoxError};
use results::{percentile, Results, Run};
use systems::{Setup, System};
use topics::Kafka;

/// pgoutbox's side-by-side benchmark (see BENCHMARKS.md).
#[derive(Parser, Debug)]
#[command(name = "bench-e2e")]
struct Args {
    /// 100,000-event drains and 20-second latency runs (instead of
    /// 1,000,000 and 60 s).
    #[arg(long)]
    quick: bool,
    /// Events per drain (overrides --quick's and the default).
    #[arg(long)]
    events: Option<u64>,
    /// Seconds of insert load per latency run (overrides --quick's and the default).
    #[arg(long)]
    latency_seconds: Option<u64>,
    /// Insert rates of the latency runs, events/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,20000")]
    rates: Vec<u32>,
    /// Systems to measure.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pg_recvlogical,pgoutbox-cdc-nomark,debezium,pgoutbox-cdc-dbzfmt,pgoutbox-cdc,pgoutbox-poll-1,pgoutbox-poll-4"
    )]
    systems: Vec<System>,
    /// Phases to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "drain,latency"
    )]
    phases: Vec<Phase>,
    /// Drain shapes: events per transaction.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    shapes: Vec<u32>,
    /// Distinct aggregate ids (Kafka keys).
    #[arg(long, default_value_t = 1000)]
    aggregates: u32,
    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Before each measurement wait up to this many seconds for the machine
    /// to be at most 20 % busy (0: do not wait).
    #[arg(long, default_value_t = 60)]
    quiet_wait: u64,
    /// Where results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The pgoutbox binary to measure.
    #[arg(long, default_value = "target/bench/bin/pgoutbox")]
    relay_bin: PathBuf,
    /// An environment variable for every pgoutbox system, `KEY=VALUE`
    /// (repeatable): a setting measured against its default, e.g.
    /// `--relay-env KAFKA_MAX_IN_FLIGHT_EVENTS=10000`. Reported with the results.
    #[arg(long, value_name = "KEY=VALUE", value_parser = relay_env)]
    relay_env: Vec<(String, String)>,
    /// Only render results.md and results.png again from this results.json
    /// (measures nothing).
    #[arg(long, value_name = "RESULTS_JSON")]
    report: Option<PathBuf>,
    /// Keep each run's topic (deleted after it was measured by default).
    #[arg(long)]
    keep_topics: bool,
    /// `cargo bench` passes this to every bench binary; without it (as under
    /// `cargo test`) nothing is measured.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Parses one `--relay-env` argument.
fn relay_env(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {arg:?}")),
    }
}

/// A phase of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Backlog drains.
    Drain,
    /// Live latency at fixed insert rates.
    Latency,
}

/// Every benchmark topic's name starts with this.
const TOPIC_PREFIX: &str = "bench-e2e-";

/// Sessions writing a drain backlog.
const FILL_SESSIONS: u64 = 4;

struct Bench {
    args: Args,
    setup: Setup,
    db: Client,
    kafka: Kafka,
    results: Results,
    failures: Vec<String>,
    stamp: u64,
    events: u64,
    latency_s: u64,
    /// The PostgreSQL server's postmaster, for its CPU seconds.
    postmaster: Option<u32>,
    /// The Kafka broker's process, for its CPU seconds.
    broker: Option<u32>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("bench: error: {}", chain(&*e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its sources ("db error: relation … does not exist").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

fn say(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

fn env(name: &str) -> Result<String, BoxError> {
    std::env::var(name).map_err(|_| {
        format!("{name} is not set (scripts/bench sets it from scripts/services env)").into()
    })
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Returns Ok(false) when some run failed (the others are reported).
async fn run() -> Result<bool, BoxError> {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` (scripts/test) builds and runs every
        // bench target without `--bench` (and perhaps with test-harness
        // arguments): that checks this one compiles, and the harness's own
        // arithmetic (no test harness here: a failed check fails the run);
        // running it is a 45-minute job for scripts/bench.
        relay_metrics::check_quantiles()?;
        say("not run: the benchmark runs through scripts/bench (cargo bench --bench e2e); its quantile arithmetic checked");
        return Ok(true);
    }
    let args = Args::parse();
    if let Some(json) = &args.report {
        return render_again(json, &args).map(|()| true);
    }
    let db_url = env("DATABASE_URL")?;
    let brokers = env("KAFKA_BROKERS")?;
    let pg_bin = PathBuf::from(
        std::env::var("PGOUTBOX_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
    );
    let recvlogical = if pg_bin.join("pg_recvlogical").exists() {
        pg_bin.join("pg_recvlogical")
    } else {
        PathBuf::from("pg_recvlogical")
    };
    if !args.relay_bin.exists() {
        return Err(format!(
            "no {} (scripts/bench builds the release binary and copies it there)",
            args.relay_bin.display()
        )
        .into());
    }
    if args.rates.contains(&0) || args.shapes.contains(&0) {
        return Err("--rates and --shapes take positive whole numbers".into());
    }
    let events = args
        .events
        .unwrap_or(if args.quick { 100_000 } else { 1_000_000 });
    let latency_s = args
        .latency_seconds
        .unwrap_or(if args.quick { 20 } else { 60 });
    let db = outbox::connect(&db_url).await?;
    // A run that died in its latency phase left the WAL writer settings on.
    outbox::flush_wal_promptly(&db, false).await?;
    let kafka = Kafka::new(&brokers, args.partitions)?;
    if !args.keep_topics {
        let n = kafka.delete_leftovers(TOPIC_PREFIX).await?;
        if n > 0 {
            say(format!(
                "deleted {n} topics of earlier runs ({TOPIC_PREFIX}*)"
            ));
        }
    }
    let mut machine = machine::describe();
    let relay_bin = std::fs::canonicalize(&args.relay_bin)?;
    let version =
        |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.to_string());
    let extra = json!({
        "date": command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "postgres": outbox::scalar(&db, "SHOW server_version").await?,
        "kafka": version("PGOUTBOX_KAFKA_VERSION", "4.4.0"),
        "debezium": version("PGOUTBOX_DEBEZIUM_VERSION", "3.6.1.Final"),
        "connect": version("PGOUTBOX_CONNECT_VERSION", "4.3.0"),
        "java": command_line(&version("PGOUTBOX_JAVA", "java"), &["-version"]),
        "pgoutbox": format!("{} ({})",
            command_line(&relay_bin.to_string_lossy(), &["--version"]).trim_start_matches("pgoutbox "),
            version("PGOUTBOX_BENCH_REV", "unknown revision")),
        "settings": {
            "events": events, "latency_seconds": latency_s, "rates": args.rates, "shapes": args.shapes,
            "partitions": args.partitions, "aggregates": args.aggregates, "fill_sessions": FILL_SESSIONS,
            "latency_writer": "one session per 1,000 events/s, synchronous_commit = off, wal_writer_delay = 1ms, wal_writer_flush_after = 0",
            "relay_env": args.relay_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        },
    });
    if let (Some(m), Some(e)) = (machine.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    let out = args.out.clone();
    let setup = Setup {
        relay_bin,
        relay_env: args.relay_env.clone(),
        recvlogical,
        debezium: std::fs::canonicalize("scripts/debezium")
            .map_err(|e| format!("scripts/debezium: {e} (run from the repository)"))?,
        logs: out.join("logs"),
        debezium_dirs: out.join("debezium"),
        db_url,
        brokers,
    };
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    // The server's CPU is read from /proc: only when it runs on this machine.
    let backend: i32 = db.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let postmaster = u32::try_from(backend).ok().and_then(machine::parent_of);
    let mut bench = Bench {
        args,
        setup,
        db,
        kafka,
        results: Results {
            machine,
            runs: Vec::new(),
            backlogs: Vec::new(),
        },
        failures: Vec::new(),
        stamp,
        events,
        latency_s,
        postmaster,
        broker: machine::kafka_broker(),
    };
    say(format!(
        "{} events per drain, {} s per latency run; results in {}",
        events,
        latency_s,
        out.display()
    ));
    if bench.args.phases.contains(&Phase::Drain) {
        for shape in bench.args.shapes.clone() {
            bench.drain_shape(shape).await?;
        }
    }
    if bench.args.phases.contains(&Phase::Latency) {
        outbox::flush_wal_promptly(&bench.db, true).await?;
        let systems: Vec<System> = System::ALL
            .into_iter()
            .filter(|s| s.delivers() && bench.args.systems.contains(s))
            .collect();
        for system in systems {
            for rate in bench.args.rates.clone() {
                let r = bench.latency_run(system, rate).await;
                bench.record(system, &latency_workload(rate), r);
            }
        }
        outbox::flush_wal_promptly(&bench.db, false).await?;
    }
    let _ = outbox::drop_slots(&bench.db).await;
    bench.results.write(&out)?;
    let systems: Vec<&str> = System::ALL
        .iter()
        .filter(|s| bench.args.systems.contains(s))
        .map(|s| s.name())
        .collect();
    let rates: Vec<String> = bench
        .args
        .rates
        .iter()
        .map(|r| latency_workload(*r))
        .collect();
    let rates: Vec<&str> = rates.iter().map(String::as_str).collect();
    let png = out.join("results.png");
    if let Err(e) = chart::draw(&bench.results, &systems, &rates, &png) {
        bench.failures.push(format!("chart: {e}"));
    }
    println!("{}", bench.results.markdown());
    say(format!(
        "wrote {0}/results.md, {0}/results.json and {0}/results.png",
        out.display()
    ));
    for f in &bench.failures {
        say(format!("FAILED: {f}"));
    }
    Ok(bench.failures.is_empty())
}

/// `--report`: results.md and results.png from a results.json, next to it.
fn render_again(json: &std::path::Path, args: &Args) -> Result<(), BoxError> {
    let text = std::fs::read_to_string(json).map_err(|e| format!("{}: {e}", json.display()))?;
    let results: Results =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", json.display()))?;
    let dir = json.parent().unwrap_or(std::path::Path::new("."));
    std::fs::write(dir.join("results.md"), results.markdown())?;
    let systems: Vec<&str> = System::ALL
        .iter()
        .filter(|s| args.systems.contains(s))
        .map(|s| s.name())
        .collect();
    let rates: Vec<String> = args.rates.iter().map(|r| latency_workload(*r)).collect();
    let rates: Vec<&str> = rates.iter().map(String::as_str).collect();
    chart::draw(&results, &systems, &rates, &dir.join("results.png"))?;
    println!("{}", results.markdown());
    Ok(())
}

fn latency_workload(rate: u32) -> String {
    if rate % 1000 == 0 {
        format!("latency-{}k", rate / 1000)
    } else {
        format!("latency-{rate}")
    }
}

impl Bench {
    /// PostgreSQL's CPU seconds so far (`None` when the server is not a
    /// process of this machine).
    fn pg_cpu(&self) -> Option<f64> {
        self.postmaster.and_then(machine::postgres_cpu_s)
    }

    /// The Kafka broker's CPU seconds so far (`None` when it is not a
    /// process of this machine).
    fn kafka_cpu(&self) -> Option<f64> {
        self.broker.and_then(machine::usage_of).map(|u| u.cpu_s)
    }

    fn selected(&self, s: System) -> bool {
        self.args.systems.contains(&s)
    }

    /// Keeps a run's result (or its failure) and rewrites the reports.
    fn record(&mut self, system: System, workload: &str, r: Result<Run, BoxError>) {
        match r {
            Ok(run) => {
                let rate = if run.events_per_s >= 1000.0 {
                    format!("{:.1}k", run.events_per_s / 1000.0)
                } else {
                    format!("{:.0}", run.events_per_s)
                };
                let lat = match (run.p50_ms, run.p99_ms, run.kept_up) {
                    (Some(a), Some(b), Some(k)) => {
                        format!(", p50 {a:.1} ms, p99 {b:.1} ms, kept up: {k}")
                    }
                    _ => String::new(),
                };
                let mut own = match (
                    run.relay_sent_p99_ms,
                    run.relay_read_p99_ms,
                    run.relay_delivered_p99_ms,
                ) {
                    (Some(s), Some(r), Some(d)) => format!(
                        "; the relay's own p99: commit → sent {s:.1} ms, → read {r:.1} ms, → delivered {d:.1} ms"
                    ),
                    _ => String::new(),
                };
                if let Some(c) = run.relay_commit_p99_ms {
                    own.push_str(&format!(", Kafka commits {c:.1} ms"));
                }
                let others = [("PostgreSQL", run.pg_cpu_s), ("Kafka", run.kafka_cpu_s)]
                    .iter()
                    .filter_map(|(who, s)| s.map(|s| format!(", {who} {s:.1} s")))
                    .collect::<String>();
                say(format!(
                    "{workload}: {}: {} events in {:.2} s = {rate}/s{lat}{own} (CPU {:.1} s{others}, peak RSS {:.0} MiB, machine {:.0} % busy)",
                    run.system, run.events, run.seconds, run.cpu_s, run.peak_rss_mib, run.machine_busy_pct
                ));
                self.results.runs.push(run);
            }
            Err(e) => {
                let e = chain(&*e);
                say(format!("{workload}: {}: FAILED: {e}", system.name()));
                self.failures
                    .push(format!("{workload} {}: {e}", system.name()));
            }
        }
        if let Err(e) = self.results.write(&self.args.out) {
            say(format!("cannot write the results: {e}"));
        }
    }

    async fn quiet(&self) -> Result<(), BoxError> {
        let (folded, seconds) = outbox::fold_journal(&self.db).await?;
        if folded > 0 {
            say(format!(
                "folded {folded} journaled rows an earlier system left, in {seconds:.1} s (charged to no system)"
            ));
        }
        self.db.batch_execute("CHECKPOINT").await?;
        if self.args.quiet_wait > 0 {
            let (waited, pct) =
                machine::wait_quiet(Duration::from_secs(self.args.quiet_wait), 20.0).await;
            if pct > 20.0 {
                say(format!(
                    "the machine is still {pct:.0} % busy after {waited:.0} s; measuring anyway"
                ));
            }
        }
        Ok(())
    }

    /// Deletes a run's topic and the side topics of `system` (progress,
    /// Kafka Connect's).
    async fn forget_topic(&self, system: System, topic: &str) {
        if !self.args.keep_topics {
            let side = systems::side_topics(system, topic);
            for t in std::iter::once(topic).chain(side.iter().map(String::as_str)) {
                if let Err(e) = self.kafka.delete_topic(t).await {
                    say(format!("could not delete {t}: {}", chain(&*e)));
                }
            }
        }
    }

    /// Creates the run's topic and, for pgoutbox exactly-once, its progress
    /// topic (Kafka Connect makes its own topics).
    async fn create_topics(&self, system: System, topic: &str) -> Result<(), BoxError> {
        self.kafka.create_topic(topic).await?;
        if system.transactional() && system != System::DebeziumEos {
            self.kafka
                .create_progress_topic(&systems::progress_topic(topic))
                .await?;
        }
        Ok(())
    }

    fn topic(&self, system: System, workload: &str) -> String {
        format!("{TOPIC_PREFIX}{}-{}-{workload}", self.stamp, system.name())
    }

    async fn drain_shape(&mut self, per_tx: u32) -> Result<(), BoxError> {
        let workload = format!("drain-{per_tx}-per-tx");
        let streamers: Vec<System> = System::ALL
            .into_iter()
            .filter(|s| s.streams() && self.selected(*s))
            .collect();
        let pollers: Vec<System> = System::ALL
            .into_iter()
            .filter(|s| !s.streams() && self.selected(*s))
            .collect();
        // A system marking rows COMPLETED adds WAL the others would have to
        // decode, and leaves rows marked that would change a second marking
        // system's work: the first marking system drains the shared backlog
        // last, every other one a fresh backlog of its own (same shape and
        // size, its slot made just before it).
        let first_marking = streamers.iter().copied().find(|s| s.marks());
        let (shared, own): (Vec<System>, Vec<System>) = streamers
            .into_iter()
            .partition(|s| !s.marks() || Some(*s) == first_marking);
        let shared: Vec<System> = shared
            .iter()
            .copied()
            .filter(|s| !s.marks())
            .chain(first_marking)
            .collect();
        outbox::reset(&self.db, &self.setup.relay_bin, &self.setup.db_url).await?;
        if !shared.is_empty() {
            for s in &shared {
                outbox::create_slot(&self.db, s.name()).await?;
            }
            let backlog = self.fill(per_tx, "streaming systems").await?;
            for s in shared {
                let slot = outbox::slot_name(s.name());
                let r = if s == System::PgRecvlogical {
                    self.drain_recvlogical(&slot, &backlog, &workload).await
                } else {
                    self.drain(s, &slot, &backlog, &workload).await
                };
                self.record(s, &workload, r);
            }
            outbox::drop_slots(&self.db).await?;
        }
        for s in own {
            outbox::truncate(&self.db).await?;
            let slot = outbox::create_slot(&self.db, s.name()).await?;
            let backlog = self.fill(per_tx, s.name()).await?;
            let r = self.drain(s, &slot, &backlog, &workload).await;
            self.record(s, &workload, r);
            outbox::drop_slots(&self.db).await?;
        }
        for s in pollers {
            outbox::truncate(&self.db).await?;
            let backlog = self.fill(per_tx, s.name()).await?;
            let r = self.drain(s, "unused", &backlog, &workload).await;
            self.record(s, &workload, r);
        }
        Ok(())
    }

    async fn fill(&mut self, per_tx: u32, what: &str) -> Result<Backlog, BoxError> {
        let b = outbox::fill(
            &self.db,
            &self.setup.db_url,
            self.events,
            per_tx,
            self.args.aggregates,
            FILL_SESSIONS,
        )
        .await?;
        outbox::settle(&self.db).await?;
        say(format!(
            "backlog for {what}: {} events, {} per transaction, written in {:.1} s, {:.0} MiB of WAL",
            b.events,
            b.per_tx,
            b.seconds,
            b.wal_bytes as f64 / 1048576.0
        ));
        self.results.backlogs.push(json!({
            "for": what, "events": b.events, "per_tx": b.per_tx, "write_s": (b.seconds * 100.0).round() / 100.0,
            "wal_mib": (b.wal_bytes as f64 / 1048576.0).round(), "sessions": FILL_SESSIONS,
        }));
        Ok(b)
    }

    async fn drain_recvlogical(
        &mut self,
        slot: &str,
        backlog: &Backlog,
        workload: &str,
    ) -> Result<Run, BoxError> {
        self.quiet().await?;
        let a = CpuTicks::now();
        let pg_a = self.pg_cpu();
        let kafka_a = self.kafka_cpu();
        let (seconds, usage) = self
            .setup
            .recvlogical(
                slot,
                &backlog.end_lsn,
                &format!("{workload}-pg_recvlogical"),
            )
            .await?;
        // Its walsender's CPU seconds count once it has exited.
        if let Some(pm) = self.postmaster {
            let deadline = Instant::now() + Duration::from_secs(10);
            while machine::walsenders(pm) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(Run {
            system: System::PgRecvlogical.name().into(),
            workload: workload.into(),
            events: backlog.events,
            seconds,
            events_per_s: backlog.events as f64 / seconds,
            cpu_s: usage.cpu_s,
            pg_cpu_s: pg_a.zip(self.pg_cpu()).map(|(a, b)| b - a),
            kafka_cpu_s: kafka_a.zip(self.kafka_cpu()).map(|(a, b)| b - a),
            peak_rss_mib: usage.peak_rss_mib,
            machine_busy_pct: a.busy_pct_until(&CpuTicks::now()),
            ..Run::default()
        })
    }

    async fn drain(
        &mut self,
        system: System,
        slot: &str,
        backlog: &Backlog,
        workload: &str,
    ) -> Result<Run, BoxError> {
        let topic = self.topic(system, workload);
        self.create_topics(system, &topic).await?;
        self.quiet().await?;
        let a = CpuTicks::now();
        let pg_a = self.pg_cpu();
        let kafka_a = self.kafka_cpu();
        let mut running = self.setup.start(
            system,
            slot,
            &topic,
            &format!("{workload}-{}", system.name()),
        )?;
        let want = backlog.events as i64;
        let deadline = Duration::from_secs(3600);
        let outcome = if system.transactional() {
            self.wait_committed(&mut running, &topic, backlog.events, deadline)
                .await
                .map(|(first, t, n)| (first, t, Some(n as i64)))
        } else {
            self.wait_for_records(&mut running, &topic, want, deadline)
                .await
                .map(|(first, t)| (first, t, None))
        };
        let (first, seconds, committed) = match outcome {
            Ok(v) => v,
            Err(e) => {
                running.stop(&self.setup);
                return Err(e);
            }
        };
        let mut usage = running.usage();
        let mut completed_s = None;
        if system.marks() {
            // The relay confirms a commit only once its rows are COMPLETED.
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                if outbox::slot_confirmed_past(&self.db, slot, &backlog.end_lsn).await? {
                    completed_s = Some(running.started.elapsed().as_secs_f64());
                    usage = running.usage();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if completed_s.is_none() {
                say(format!(
                    "{}: the slot was not confirmed past the backlog within 600 s",
                    system.name()
                ));
            }
        }
        let busy = a.busy_pct_until(&CpuTicks::now());
        let pg_cpu_s = pg_a.zip(self.pg_cpu()).map(|(a, b)| b - a);
        let kafka_cpu_s = kafka_a.zip(self.kafka_cpu()).map(|(a, b)| b - a);
        running.stop(&self.setup);
        let records = match committed {
            // What the transactions hold, read again after the stop.
            Some(_) => {
                let topic2 = topic.clone();
                tokio::task::block_in_place(|| self.kafka.committed(&topic2))?.0 as i64
            }
            None => self.kafka.end_offsets(&topic)?,
        };
        if records != want {
            say(format!(
                "{}: {topic} holds {records} records for {want} events",
                system.name()
            ));
        }
        self.forget_topic(system, &topic).await;
        Ok(Run {
            system: system.name().into(),
            workload: workload.into(),
            events: backlog.events,
            seconds,
            events_per_s: backlog.events as f64 / seconds,
            first_event_s: first,
            completed_s,
            duplicates: (records > want).then(|| (records - want) as u64),
            cpu_s: usage.cpu_s,
            pg_cpu_s,
            kafka_cpu_s,
            peak_rss_mib: usage.peak_rss_mib,
            machine_busy_pct: busy,
            ..Run::default()
        })
    }

    async fn latency_run(&mut self, system: System, rate: u32) -> Result<Run, BoxError> {
        let workload = latency_workload(rate);
        outbox::reset(&self.db, &self.setup.relay_bin, &self.setup.db_url).await?;
        let slot = if system.streams() {
            outbox::create_slot(&self.db, system.name()).await?
        } else {
            "unused".into()
        };
        let topic = self.topic(system, &workload);
        self.create_topics(system, &topic).await?;
        // A read_committed consumer reading as the events arrive: when each
        // became visible (for a transactional system: its Kafka
        // transaction committed).
        let live = self.kafka.live(&topic)?;
        self.quiet().await?;
        let mut running = self.setup.start(
            system,
            &slot,
            &topic,
            &format!("{workload}-{}", system.name()),
        )?;
        // Streaming: one event delivered end to end (seen by the consumer)
        // before the load starts.
        outbox::insert_one(&self.db).await?;
        if let Err(e) = self
            .wait_live(&mut running, &live, 1, Duration::from_secs(300))
            .await
        {
            running.stop(&self.setup);
            return Err(e);
        }
        let a = CpuTicks::now();
        let pg_a = self.pg_cpu();
        let kafka_a = self.kafka_cpu();
        let since_us = now_us();
        let traffic = outbox::traffic(
            &self.setup.db_url,
            rate,
            self.latency_s,
            self.args.aggregates,
        )
        .await;
        let traffic = match traffic {
            Ok(t) => t,
            Err(e) => {
                running.stop(&self.setup);
                return Err(e);
            }
        };
        let load_end = running.started.elapsed().as_secs_f64();
        let want = traffic.inserted + 1;
        let deadline = Duration::from_secs_f64(load_end + (self.latency_s as f64).max(60.0));
        let caught_up = self.wait_live(&mut running, &live, want, deadline).await;
        let usage = running.usage();
        let busy = a.busy_pct_until(&CpuTicks::now());
        let pg_cpu_s = pg_a.zip(self.pg_cpu()).map(|(a, b)| b - a);
        let kafka_cpu_s = kafka_a.zip(self.kafka_cpu()).map(|(a, b)| b - a);
        let own = running
            .metrics
            .as_deref()
            .and_then(relay_metrics::scrape)
            .unwrap_or_default();
        let own_q = |stage: &str, q: f64| {
            let label = format!("stage=\"{stage}\"");
            relay_metrics::quantile_ms(&own, "pgoutbox_event_latency_seconds", &label, q)
        };
        let commit_p99 =
            relay_metrics::quantile_ms(&own, "pgoutbox_kafka_transaction_commit_seconds", "", 0.99);
        running.stop(&self.setup);
        let catch_up_s = caught_up.as_ref().ok().map(|t| (t - load_end).max(0.0));
        let (mut visible, _) = live.finish(since_us)?;
        visible.sort_by(f64::total_cmp);
        let topic2 = topic.clone();
        let read = tokio::task::block_in_place(|| self.kafka.latencies(&topic2, since_us));
        self.forget_topic(system, &topic).await;
        let (mut appended, duplicates) = read?;
        appended.sort_by(f64::total_cmp);
        // The system's latency: commit to visible for a read_committed
        // consumer. Without transactions a record is visible once appended
        // (one replica), so the broker's log-append time is that moment
        // without the consumer's own delay; with transactions only the
        // consumer can tell when the commit made it visible.
        let lat = if system.transactional() {
            &visible
        } else {
            &appended
        };
        let offered = traffic.inserted as f64 / traffic.seconds;
        let delivered_all = lat.len() as u64 >= traffic.inserted;
        if !delivered_all {
            say(format!(
                "{}: {} of {} events arrived",
                system.name(),
                lat.len(),
                traffic.inserted
            ));
        }
        let kept_up = delivered_all
            && catch_up_s.is_some_and(|c| c <= 5.0)
            && offered >= 0.95 * f64::from(rate);
        Ok(Run {
            system: system.name().into(),
            workload,
            events: traffic.inserted,
            seconds: traffic.seconds,
            events_per_s: offered,
            p50_ms: percentile(lat, 0.50),
            p99_ms: percentile(lat, 0.99),
            p999_ms: percentile(lat, 0.999),
            max_ms: lat.last().copied(),
            visible_p50_ms: percentile(&visible, 0.50),
            visible_p99_ms: percentile(&visible, 0.99),
            visible_p999_ms: percentile(&visible, 0.999),
            append_p50_ms: system
                .transactional()
                .then(|| percentile(&appended, 0.50))
                .flatten(),
            append_p99_ms: system
                .transactional()
                .then(|| percentile(&appended, 0.99))
                .flatten(),
            relay_sent_p99_ms: own_q("sent", 0.99),
            relay_read_p99_ms: own_q("read", 0.99),
            relay_delivered_p50_ms: own_q("delivered", 0.50),
            relay_delivered_p99_ms: own_q("delivered", 0.99),
            relay_commit_p99_ms: commit_p99,
            kept_up: Some(kept_up),
            catch_up_s,
            target_per_s: Some(rate),
            duplicates: Some(duplicates),
            cpu_s: usage.cpu_s,
            pg_cpu_s,
            kafka_cpu_s,
            peak_rss_mib: usage.peak_rss_mib,
            machine_busy_pct: busy,
            ..Run::default()
        })
    }
}

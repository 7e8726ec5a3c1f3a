//! What a benchmark run measured, and the reports made of it:
//! results.json (the schema plus a few more fields), results.md (the
//! table and the goals), both rewritten after every run so an interrupted
//! benchmark keeps what it measured.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::outbox::BoxError;

/// One system on one workload.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Run {
    /// `pg_recvlogical`, `pgoutbox-cdc`, … (systems::System::name).
    pub system: String,
    /// `drain-1-per-tx`, `drain-100-per-tx`, `latency-1k`, …
    pub workload: String,
    /// Events the workload consisted of (a latency run: those inserted).
    pub events: u64,
    /// Drain: from the system's start until the last event was in Kafka —
    /// for a transactional system, until its transaction committed (or,
    /// for pg_recvlogical, decoded). Latency: the length of the insert load.
    pub seconds: f64,
    /// events / seconds.
    pub events_per_s: f64,
    /// Latency percentiles, ms: commit (insert's clock_timestamp) to the
    /// broker's log-append time; for a transactional system (exactly-once)
    /// to the moment a read_committed consumer had the event (its Kafka
    /// transaction committed), as in `visible_*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub p999_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub max_ms: Option<f64>,
    /// Latency percentiles, commit to the moment a read_committed consumer
    /// reading during the run had the event (every system: the consumer's
    /// own fetch delay included), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visible_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub visible_p99_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub visible_p999_ms: Option<f64>,
    /// Transactional systems: commit to the broker's log-append time (the
    /// record is in the log, not yet visible to read_committed), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub append_p99_ms: Option<f64>,
    /// Latency run of pgoutbox, from its own `pgoutbox_event_latency_seconds`:
    /// p99 of PostgreSQL commit → sent by the server (PostgreSQL's side), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_sent_p99_ms: Option<f64>,
    /// … p99 of PostgreSQL commit → read by the relay, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_read_p99_ms: Option<f64>,
    /// … p50 of PostgreSQL commit → in Kafka for consumers (acknowledged,
    /// or its Kafka transaction committed), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_delivered_p50_ms: Option<f64>,
    /// … and its p99, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_delivered_p99_ms: Option<f64>,
    /// Exactly-once: p99 of its Kafka commits' duration
    /// (`pgoutbox_kafka_transaction_commit_seconds`), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_commit_p99_ms: Option<f64>,
    /// Latency run: every event arrived, within 5 s of the end of the load,
    /// and the writer reached 95 % of the asked rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_up: Option<bool>,
    /// Latency run: seconds after the load ended until the last event was in Kafka.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub catch_up_s: Option<f64>,
    /// Latency run: the rate the writer was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_per_s: Option<u32>,
    /// Latency run: records that repeated an event (at-least-once duplicates).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicates: Option<u64>,
    /// Seconds from the start until the first event was in Kafka (start-up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_event_s: Option<f64>,
    /// Drain of a system marking rows (pgoutbox-cdc, pgoutbox-cdc-eos…):
    /// seconds until the slot was confirmed past the backlog (every row
    /// marked COMPLETED, since the relay confirms a commit only after
    /// marking its rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_s: Option<f64>,
    /// CPU seconds of the system's process (user + system).
    pub cpu_s: f64,
    /// CPU seconds PostgreSQL spent during the run (all its processes:
    /// decoding in the walsender, the relay's marks, WAL writing; in a
    /// latency run mostly the load writer's inserts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_cpu_s: Option<f64>,
    /// CPU seconds the Kafka broker spent during the run (a broker that is
    /// a process of this machine only): with PostgreSQL's and the system's,
    /// where a busy machine's load went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka_cpu_s: Option<f64>,
    /// Its peak resident memory (VmHWM / ru_maxrss), MiB.
    pub peak_rss_mib: f64,
    /// How busy the whole machine was during the run (both cores = 100).
    pub machine_busy_pct: f64,
}

impl Run {
    /// events / the seconds from the first event in Kafka to the last: the
    /// rate without the system's start-up (a JVM's, a slot's snapshot),
    /// which dominates a short (`--quick`) drain. `None` without a first
    /// event's time.
    pub fn delivering_events_per_s(&self) -> Option<f64> {
        let first = self.first_event_s?;
        let span = self.seconds - first;
        (span > 0.0).then(|| self.events as f64 / span)
    }
}

/// Everything measured so far.
#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    /// The machine and the versions of everything measured.
    pub machine: Value,
    /// One entry per system and workload.
    pub runs: Vec<Run>,
    /// Per drain shape: how the backlog was written.
    pub backlogs: Vec<Value>,
}

impl Results {
    /// The run of `system` on `workload`, if measured.
    pub fn find(&self, system: &str, workload: &str) -> Option<&Run> {
        self.runs
            .iter()
            .find(|r| r.system == system && r.workload == workload)
    }

    /// Writes results.json and results.md into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), BoxError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        Ok(())
    }

    /// The table and the goals, in Markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Measured {} on {} cores ({}), {} GiB, kernel {}; PostgreSQL {}, Kafka {}, Debezium {} on Kafka Connect {}, pgoutbox {}.\n",
            m["date"].as_str().unwrap_or("?"),
            m["cores"],
            m["cpu"].as_str().unwrap_or("?"),
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or("?"),
            m["postgres"].as_str().unwrap_or("?"),
            m["kafka"].as_str().unwrap_or("?"),
            m["debezium"].as_str().unwrap_or("?"),
            m["connect"].as_str().unwrap_or("?"),
            m["pgoutbox"].as_str().unwrap_or("?"),
        );
        if let Some(env) = m["settings"]["relay_env"]
            .as_array()
            .filter(|e| !e.is_empty())
        {
            let env: Vec<&str> = env.iter().filter_map(|v| v.as_str()).collect();
            let _ = writeln!(md, "Every pgoutbox system ran with `{}`.\n", env.join(" "));
        }
        md.push_str("| system | workload | events | seconds | events/s | events/s from the first event | p50 ms | p99 ms | p99.9 ms | max ms | read_committed p50 / p99 ms | kept up | CPU s | peak RSS MiB | machine busy |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n");
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "".into());
        for r in &self.runs {
            let kept = match (r.kept_up, r.catch_up_s) {
                (Some(k), Some(c)) => format!("{} (+{c:.1} s)", if k { "yes" } else { "**no**" }),
                (Some(k), None) => (if k { "yes" } else { "**no**" }).to_string(),
                _ => String::new(),
            };
            let visible = match (r.visible_p50_ms, r.visible_p99_ms) {
                (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                _ => String::new(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} % |",
                r.system,
                r.workload,
                r.events,
                r.seconds,
                r.events_per_s,
                if r.workload.starts_with("drain") {
                    r.delivering_events_per_s()
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or_default()
                } else {
                    String::new()
                },
                opt(r.p50_ms),
                opt(r.p99_ms),
                opt(r.p999_ms),
                opt(r.max_ms),
                visible,
                kept,
                r.cpu_s,
                r.peak_rss_mib,
                r.machine_busy_pct
            );
        }
        md.push('\n');
        md.push_str(&self.cpu_per_million());
        md.push_str(&self.goals());
        md
    }

    /// CPU seconds per million events of each drain, the system's and
    /// PostgreSQL's apart (marking rows is PostgreSQL's work).
    fn cpu_per_million(&self) -> String {
        let drains: Vec<&Run> = self
            .runs
            .iter()
            .filter(|r| r.pg_cpu_s.is_some() && r.events > 0 && r.target_per_s.is_none())
            .collect();
        if drains.is_empty() {
            return String::new();
        }
        let mut md = String::from(
            "CPU seconds per million events, drains:\n\n| system | workload | the system | PostgreSQL | both |\n|---|---|---:|---:|---:|\n",
        );
        for r in drains {
            let per = |s: f64| s * 1e6 / r.events as f64;
            let pg = r.pg_cpu_s.unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                r.system,
                r.workload,
                per(r.cpu_s),
                per(pg),
                per(r.cpu_s + pg)
            );
        }
        md.push('\n');
        md
    }

    /// The goals against what was measured.
    fn goals(&self) -> String {
        let mut md = String::from("| goal | measured | met |\n|---|---|---|\n");
        let mut row = |goal: &str, measured: String, met: Option<bool>| {
            let met = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "not measured",
            };
            let _ = writeln!(md, "| {goal} | {measured} | {met} |");
        };
        for shape in ["drain-1-per-tx", "drain-100-per-tx"] {
            let cdc = self.find("pgoutbox-cdc", shape);
            let nomark = self.find("pgoutbox-cdc-nomark", shape);
            let recv = self.find("pg_recvlogical", shape);
            if let (Some(recv), Some(cdc), Some(nomark)) = (recv, cdc, nomark) {
                let a = cdc.events_per_s / recv.events_per_s;
                let b = nomark.events_per_s / recv.events_per_s;
                // The same ratios without start-up, which a quick run's
                // short drains are dominated by. pg_recvlogical writes no
                // topic to time its first event by; its start-up is one
                // connection (milliseconds), so its rate stands as it is.
                let ceiling = recv.delivering_events_per_s().unwrap_or(recv.events_per_s);
                let delivering = |r: &Run| Some(r.delivering_events_per_s()? / ceiling);
                let steady = match (delivering(cdc), delivering(nomark)) {
                    (Some(a), Some(b)) => format!(
                        "; from the first event: {:.0} %, {:.0} %",
                        a * 100.0,
                        b * 100.0
                    ),
                    _ => String::new(),
                };
                row(
                    &format!("CDC drain ≥ 85 % of pg_recvlogical ({shape})"),
                    format!(
                        "{:.0} % (marking), {:.0} % (not marking){steady}",
                        a * 100.0,
                        b * 100.0
                    ),
                    Some(a >= 0.85 && b >= 0.85),
                );
            } else {
                row(
                    &format!("CDC drain ≥ 85 % of pg_recvlogical ({shape})"),
                    String::new(),
                    None,
                );
            }
            let goal = format!("≥ 5× Debezium's drain rate at ≤ 1/5 of its peak RSS ({shape})");
            match self.find("debezium", shape) {
                Some(dbz) => {
                    let mut measured = Vec::new();
                    let mut met = None;
                    for (r, what) in [(cdc, "marking"), (nomark, "not marking")] {
                        if let Some(r) = r {
                            let rate = r.events_per_s / dbz.events_per_s;
                            let rss = r.peak_rss_mib / dbz.peak_rss_mib;
                            // Debezium's JVM start dominates a quick run.
                            let steady = match (
                                r.delivering_events_per_s(),
                                dbz.delivering_events_per_s(),
                            ) {
                                (Some(a), Some(b)) => {
                                    format!(" ({:.1}× from the first event)", a / b)
                                }
                                _ => String::new(),
                            };
                            measured.push(format!(
                                "{what}: {rate:.1}× the rate{steady} at 1/{:.0} of the RSS",
                                1.0 / rss
                            ));
                            met = Some(met.unwrap_or(true) && rate >= 5.0 && rss <= 0.2);
                        }
                    }
                    row(&goal, measured.join("; "), met);
                }
                None => row(&goal, String::new(), None),
            }
        }
        match self.find("pgoutbox-cdc", "latency-5k") {
            Some(r) => {
                let p99 = r.p99_ms.unwrap_or(f64::INFINITY);
                row(
                    "p99 commit→Kafka ≤ 25 ms at 5k events/s (pgoutbox-cdc)",
                    format!("{p99:.1} ms"),
                    Some(p99 <= 25.0),
                )
            }
            None => row(
                "p99 commit→Kafka ≤ 25 ms at 5k events/s (pgoutbox-cdc)",
                String::new(),
                None,
            ),
        }
        match self.find("pgoutbox-cdc", "latency-20k") {
            Some(r) => row(
                "keeps up at 20k events/s (pgoutbox-cdc)",
                format!(
                    "writer reached {:.0} events/s; caught up {:.1} s after the load",
                    r.events_per_s,
                    r.catch_up_s.unwrap_or(f64::NAN)
                ),
                r.kept_up,
            ),
            None => row(
                "keeps up at 20k events/s (pgoutbox-cdc)",
                String::new(),
                None,
            ),
        }
        self.eos_goals(&mut row);
        for shape in ["drain-1-per-tx", "drain-100-per-tx"] {
            match self.find("pgoutbox-poll-4", shape) {
                Some(r) => row(
                    &format!("poll mode ≥ 10k events/s with 4 workers ({shape})"),
                    format!("{:.0} events/s", r.events_per_s),
                    Some(r.events_per_s >= 10_000.0),
                ),
                None => row(
                    &format!("poll mode ≥ 10k events/s with 4 workers ({shape})"),
                    String::new(),
                    None,
                ),
            }
        }
        md
    }
}

impl Results {
    /// Exactly-once delivery's goals: pgoutbox-cdc-eos against pgoutbox-cdc
    /// measured in the same run.
    fn eos_goals(&self, row: &mut impl FnMut(&str, String, Option<bool>)) {
        if !self.runs.iter().any(|r| r.system == "pgoutbox-cdc-eos") {
            return;
        }
        for (shape, min) in [("drain-1-per-tx", 0.8), ("drain-100-per-tx", 0.9)] {
            let goal = format!("exactly-once drain ≥ {min}× at-least-once ({shape})");
            match (
                self.find("pgoutbox-cdc-eos", shape),
                self.find("pgoutbox-cdc", shape),
            ) {
                (Some(eos), Some(alo)) => {
                    let ratio = eos.events_per_s / alo.events_per_s;
                    row(
                        &goal,
                        format!(
                            "{ratio:.2}× ({:.0} against {:.0} events/s)",
                            eos.events_per_s, alo.events_per_s
                        ),
                        Some(ratio >= min),
                    )
                }
                _ => row(&goal, String::new(), None),
            }
        }
        let goal = "exactly-once p99 commit→visible (read_committed) ≤ 50 ms at 5k events/s";
        match self.find("pgoutbox-cdc-eos", "latency-5k") {
            Some(r) => {
                let p99 = r.p99_ms.unwrap_or(f64::INFINITY);
                row(goal, format!("{p99:.1} ms"), Some(p99 <= 50.0))
            }
            None => row(goal, String::new(), None),
        }
        let peak = self
            .runs
            .iter()
            .filter(|r| r.system == "pgoutbox-cdc-eos")
            .map(|r| r.peak_rss_mib)
            .fold(0.0, f64::max);
        row(
            "exactly-once peak RSS ≤ 64 MiB (every run of pgoutbox-cdc-eos)",
            format!("{peak:.0} MiB"),
            Some(peak <= 64.0),
        );
    }
}

/// The nearest-rank percentile `q` (0..=1) of sorted `values`.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

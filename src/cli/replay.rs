//! `pgoutbox replay`: re-publishes delivered or dead-lettered events (see
//! docs/replay.md), with its progress on a terminal and the text forms of
//! what it prints.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::operate::replay::{self, DryRun, Progress, ReplayReport, ReplayRequest, ReplayResult};
use crate::outbox::replay::{parse_time, ReplayEnd, ReplaySelection, ReplayStatus};

use super::{connect_for_command, to_json};

/// `pgoutbox replay`'s arguments as given on the command line (checked
/// here, so every mistake is one line saying what to fix).
#[derive(Clone, Debug, Default)]
pub struct ReplayArgs {
    /// `--from`, RFC 3339.
    pub from: Option<String>,
    /// `--to`, RFC 3339.
    pub to: Option<String>,
    /// `--aggregate-type`, repeatable.
    pub aggregate_types: Vec<String>,
    /// `--aggregate-id`, repeatable.
    pub aggregate_ids: Vec<String>,
    /// `--event-type`, repeatable.
    pub event_types: Vec<String>,
    /// `--status`: `completed` or `dead-letter`.
    pub status: String,
    /// `--where`: raw SQL over the outbox columns.
    pub condition: Option<String>,
    /// `--topic`: every event to this topic.
    pub topic: Option<String>,
    /// `--rate`: events per second.
    pub rate: Option<String>,
    /// `--max-events`.
    pub max_events: u64,
    /// `--reason`.
    pub reason: Option<String>,
    /// `--dry-run`.
    pub dry_run: bool,
    /// `--statement-timeout`.
    pub statement_timeout: Duration,
    /// `--json`.
    pub json: bool,
}

impl ReplayArgs {
    /// The request, or the first argument that cannot be used.
    fn request(&self) -> Result<ReplayRequest, Error> {
        let refuse = |e: crate::outbox::replay::ReplayError| Error::Fatal(e.to_string());
        let time = |flag: &'static str, t: &Option<String>| {
            t.as_deref()
                .map(|t| parse_time(flag, t))
                .transpose()
                .map_err(refuse)
        };
        let rate = match &self.rate {
            None => None,
            Some(t) => Some(t.trim().parse::<f64>().map_err(|_| {
                refuse(crate::outbox::replay::ReplayError::BadRate(format!(
                    "{t:?}"
                )))
            })?),
        };
        Ok(ReplayRequest {
            selection: ReplaySelection {
                status: ReplayStatus::parse(&self.status).map_err(refuse)?,
                from: time("--from", &self.from)?,
                to: time("--to", &self.to)?,
                aggregate_types: self.aggregate_types.clone(),
                aggregate_ids: self.aggregate_ids.clone(),
                event_types: self.event_types.clone(),
                condition: self.condition.clone(),
            },
            reason: self.reason.clone(),
            target_topic: self.topic.clone(),
            rate,
            max_events: self.max_events,
            dry_run: self.dry_run,
            statement_timeout: self.statement_timeout,
        })
    }
}

/// `pgoutbox replay`: refuses what it can before connecting, then replays
/// (or dry-runs). The summary goes to stdout, progress to stderr when it is
/// a terminal. A replay that did not send everything it selected ends with
/// an error (non-zero exit) after its summary.
pub async fn replay(config: &Config, args: ReplayArgs) -> Result<(), Error> {
    let request = args.request()?;
    replay::check_request(config, &request)?;
    let mut client = connect_for_command(config).await?;
    let (stop_tx, stop) = watch::channel(false);
    let signals = tokio::spawn(async move {
        super::run::wait_for_signal().await;
        let _ = stop_tx.send(true);
        super::run::wait_for_signal().await;
        std::process::exit(130);
    });
    let terminal = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut show = |p: &Progress| {
        if terminal {
            shown = true;
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\x1b[K", progress_line(p));
            let _ = err.flush();
        }
    };
    let result = replay::replay(&mut client, config, &request, stop, &mut show).await;
    signals.abort();
    if shown {
        eprintln!();
    }
    match result? {
        ReplayResult::DryRun(report) => {
            if args.json {
                println!("{}", to_json(&report)?);
            } else {
                print!("{}", format_dry_run(&report));
            }
            Ok(())
        }
        ReplayResult::Replayed(report) => {
            if args.json {
                println!("{}", to_json(&report)?);
            } else {
                println!("{}", summary(&report));
            }
            outcome(&report)
        }
    }
}

/// The progress line: count / total, percentage, rate.
fn progress_line(p: &Progress) -> String {
    let secs = p.elapsed.as_secs_f64().max(1e-3);
    let rate = p.done as f64 / secs;
    let refused = if p.refused > 0 {
        format!(", {} refused", p.refused)
    } else {
        String::new()
    };
    match (p.dry_run, p.total) {
        (true, _) => format!("dry run: {} rows read ({rate:.0}/s){refused}", p.done),
        (false, Some(total)) if total > 0 => format!(
            "replay: {}/{total} acknowledged ({:.0}%), {rate:.1}/s{refused}",
            p.done,
            p.done as f64 * 100.0 / total as f64
        ),
        (false, _) => format!("replay: {} acknowledged, {rate:.1}/s{refused}", p.done),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn destination(topic: &Option<String>) -> String {
    match topic {
        Some(t) => format!("topic {t}"),
        None => "their own topics".to_owned(),
    }
}

/// The text form of a dry run: counts by topic and event type, the
/// refusals, a sample.
fn format_dry_run(r: &DryRun) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dry run: {} ({} rows of {} created before {}) would be replayed to {}; nothing was sent or recorded",
        plural(r.selected, "event", "events"),
        r.status,
        r.table,
        r.until,
        destination(&r.target_topic)
    );
    let width = r
        .by_topic
        .iter()
        .map(|c| c.topic.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let _ = writeln!(out, "\n{:>7}  {:width$}  EVENT_TYPE", "COUNT", "TOPIC");
    for c in &r.by_topic {
        let _ = writeln!(out, "{:>7}  {:width$}  {}", c.count, c.topic, c.event_type);
    }
    if r.refused > 0 {
        let _ = writeln!(
            out,
            "\n{} cannot be published (they would be counted as refused and not sent):",
            plural(r.refused, "event", "events")
        );
        for f in &r.refusals {
            let _ = writeln!(out, "  {}: {}", f.tracking_id, f.error);
        }
    }
    if !r.sample.is_empty() {
        let _ = writeln!(
            out,
            "\nsample (the first {} in replay order):",
            r.sample.len()
        );
        for s in &r.sample {
            let _ = writeln!(
                out,
                "  {}  {}  {}/{}  {}  -> {}",
                s.tracking_id,
                s.created_at,
                s.aggregate_type,
                s.aggregate_id,
                s.event_type,
                s.topic
            );
            let _ = writeln!(out, "      key {}  value {}", s.key, s.value);
        }
    }
    if r.over_max_events {
        let _ = writeln!(
            out,
            "\nthe selection holds more than --max-events {}: the replay would be refused; narrow it or raise --max-events",
            r.max_events
        );
    }
    out
}

/// The one-line summary of a replay.
fn summary(r: &ReplayReport) -> String {
    let verb = match r.end {
        ReplayEnd::Completed => "replayed",
        ReplayEnd::Failed => "replay FAILED:",
        ReplayEnd::Interrupted => "replay INTERRUPTED:",
    };
    let secs = r.elapsed_s.max(1e-3);
    let mut line = format!(
        "{verb} {} of {} events ({} rows of {}) to {} in {:.1}s ({:.1}/s); audit entry #{} by {} at {}; each record carries header {}={}",
        r.sent,
        r.selected,
        r.status,
        r.table,
        destination(&r.target_topic),
        r.elapsed_s,
        r.sent as f64 / secs,
        r.audit.id,
        r.audit.performed_by,
        r.audit.started_at,
        crate::pipeline::record::header::REPLAY,
        r.audit.id,
    );
    if r.refused > 0 {
        line.push_str(&format!("; {} refused", r.refused));
    }
    if r.vanished > 0 {
        line.push_str(&format!(
            "; {} changed status before being read (not sent)",
            r.vanished
        ));
    }
    line
}

/// The command's outcome: an error unless every selected event was sent.
fn outcome(r: &ReplayReport) -> Result<(), Error> {
    let rerun = "rerunning the same selection is safe (delivery is at least once: events already sent are sent again, and consumers deduplicate on the event id)";
    match (&r.error, r.refused) {
        (Some(why), _) => {
            let resume = r
                .resume_from
                .map(|t| format!("; to skip what was surely acknowledged, rerun with --from {t}"))
                .unwrap_or_default();
            Err(Error::Fatal(format!(
                "replay #{} stopped: {why}; {rerun}{resume}",
                r.audit.id
            )))
        }
        (None, 0) => Ok(()),
        (None, refused) => {
            let first = r
                .refusals
                .first()
                .map(|f| format!(" (first: {}: {})", f.tracking_id, f.error))
                .unwrap_or_default();
            Err(Error::Fatal(format!(
                "replay #{}: {} could not be published{first}; the other {} were sent",
                r.audit.id,
                plural(refused, "event", "events"),
                r.sent
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_shows_count_total_and_rate() {
        let p = Progress {
            done: 50,
            total: Some(200),
            refused: 0,
            elapsed: Duration::from_secs(5),
            dry_run: false,
        };
        assert_eq!(
            progress_line(&p),
            "replay: 50/200 acknowledged (25%), 10.0/s"
        );
        let p = Progress {
            refused: 2,
            dry_run: true,
            ..p
        };
        assert_eq!(progress_line(&p), "dry run: 50 rows read (10/s), 2 refused");
    }

    #[test]
    fn bad_arguments_are_one_line_errors_naming_the_flag() {
        let base = ReplayArgs {
            status: "completed".into(),
            max_events: 10,
            ..ReplayArgs::default()
        };
        for (args, flag) in [
            (
                ReplayArgs {
                    status: "pending".into(),
                    ..base.clone()
                },
                "--status",
            ),
            (
                ReplayArgs {
                    from: Some("last tuesday".into()),
                    ..base.clone()
                },
                "--from",
            ),
            (
                ReplayArgs {
                    rate: Some("fast".into()),
                    ..base.clone()
                },
                "--rate",
            ),
        ] {
            let e = args.request().unwrap_err().to_string();
            assert!(e.contains(flag) && !e.contains('\n'), "{e}");
        }
        assert!(base.request().is_ok());
    }
}

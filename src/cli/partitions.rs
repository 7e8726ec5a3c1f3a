//! `pgoutbox partitions maintain`: partitions ahead, then retention, and
//! `pgoutbox partitions convert`: an adopted unpartitioned table made
//! partitioned online (see docs/partitioning.md); their text forms.

use crate::config::Config;
use crate::error::Error;
use crate::operate::partitions::MaintainReport;

use super::{connect_for_command, to_json};

/// `pgoutbox partitions maintain`'s options.
#[derive(Clone, Debug, Default)]
pub struct MaintainArgs {
    /// Archive retired partitions here (gzip JSON lines) before dropping.
    pub archive_dir: Option<std::path::PathBuf>,
    /// Change nothing; say what would be done.
    pub dry_run: bool,
    /// How long to wait for the outbox's lock per partition.
    pub lock_timeout: std::time::Duration,
    /// JSON output.
    pub json: bool,
    /// A fake clock (any timestamptz PostgreSQL reads, e.g.
    /// `2031-05-30T12:00:00Z`); the server's `now()` when unset.
    pub now: Option<String>,
}

/// `pgoutbox partitions maintain`: partitions ahead, then retention (see
/// docs/partitioning.md). An error stops it with a non-zero exit; what was
/// done before stays done and is printed.
pub async fn partitions_maintain(config: &Config, args: MaintainArgs) -> Result<(), Error> {
    let mut client = connect_for_command(config).await?;
    let clock = match &args.now {
        None => crate::operate::partitions::Clock::Server,
        Some(text) => {
            let at: std::time::SystemTime = client
                .query_one("SELECT $1::text::timestamptz", &[text])
                .await
                .map_err(|e| {
                    Error::Fatal(format!(
                        "--now {text:?}: {}",
                        crate::error::postgres_text(&e)
                    ))
                })?
                .get(0);
            crate::operate::partitions::Clock::Fixed(at)
        }
    };
    let options = crate::operate::partitions::MaintainOptions {
        archive_dir: args.archive_dir,
        dry_run: args.dry_run,
        lock_timeout: args.lock_timeout,
        clock,
    };
    let report = crate::operate::partitions::maintain(&mut client, config, &options).await?;
    if args.json {
        println!("{}", to_json(&report)?);
    } else {
        print!("{}", format_maintain(&report));
    }
    match &report.error {
        Some(e) => Err(Error::Fatal(e.clone())),
        None => Ok(()),
    }
}

/// The text form of `pgoutbox partitions maintain`.
pub fn format_maintain(r: &MaintainReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (would, created, retired) = if r.dry_run {
        ("dry run, nothing changed: ", "would create", "would retire")
    } else {
        ("", "created", "retired")
    };
    let _ = writeln!(
        out,
        "{would}{} at {}: {} partitions, {} ahead",
        r.table, r.now, r.interval, r.ahead
    );
    for c in &r.created {
        let _ = writeln!(
            out,
            "  {created} {} [{}, {})",
            c.name, c.range_start, c.range_end
        );
    }
    if r.created.is_empty() {
        let _ = writeln!(out, "  partitions ahead: all present");
    }
    let range = |a: &Option<String>, b: &Option<String>| {
        format!(
            "[{}, {})",
            a.as_deref().unwrap_or("MINVALUE"),
            b.as_deref().unwrap_or("MAXVALUE")
        )
    };
    match (&r.retain, &r.cutoff) {
        (Some(retain), Some(cutoff)) => {
            let _ = writeln!(
                out,
                "retention {retain}: partitions ending at or before {cutoff}"
            );
            for p in &r.retired {
                let archive = match (&p.archive, p.archived_rows) {
                    (Some(a), Some(n)) => format!(", {n} rows archived to {a}"),
                    (Some(a), None) => format!(", archived to {a}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {retired} {} {}{archive}",
                    p.name,
                    range(&p.range_start, &p.range_end)
                );
            }
            for k in &r.kept {
                let _ = writeln!(
                    out,
                    "  kept {} {}: {}",
                    k.name,
                    range(&k.range_start, &k.range_end),
                    k.reason
                );
            }
            if r.retired.is_empty() && r.kept.is_empty() {
                let _ = writeln!(out, "  nothing old enough");
            }
        }
        _ => {
            let _ = writeln!(out, "retention off (partitions.retain is not set)");
        }
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "stopped: {e}");
    }
    out
}

/// `pgoutbox partitions convert`'s options.
#[derive(Clone, Debug)]
pub struct ConvertArgs {
    /// Only check and print the swap's statements.
    pub dry_run: bool,
    /// How long the swap waits for the table's lock per attempt.
    pub lock_timeout: std::time::Duration,
    /// How many times the swap is tried.
    pub attempts: u32,
    /// JSON output.
    pub json: bool,
}

/// `pgoutbox partitions convert`: the configured (adopted, unpartitioned)
/// outbox table becomes the first partition of a partitioned table of the
/// same name, online (see [`crate::outbox::convert`]). A refusal says what
/// to change; nothing is changed before the checks pass.
pub async fn partitions_convert(config: &Config, args: ConvertArgs) -> Result<(), Error> {
    use crate::outbox::{convert, AdoptError};
    let mut client = connect_for_command(config).await?;
    let options = convert::ConvertOptions {
        dry_run: args.dry_run,
        lock_timeout: args.lock_timeout,
        attempts: args.attempts.max(1),
    };
    let report = convert::convert(&mut client, config, &options)
        .await
        .map_err(|e| match e {
            AdoptError::Database { doing, source } => Error::postgres(&doing, &source),
            AdoptError::Refused(why) => Error::Fatal(why),
        })?;
    if args.json {
        println!("{}", to_json(&report)?);
        return Ok(());
    }
    if report.dry_run {
        println!(
            "{} can be converted: it becomes partition {} (created_at before {}); the swap would run:",
            report.table, report.legacy_partition, report.bound
        );
        for statement in &report.swap {
            println!("  {statement};");
        }
    } else {
        println!(
            "{} is partitioned: {} holds created_at before {}",
            report.table, report.legacy_partition, report.bound
        );
        for step in &report.steps {
            println!("  {step}");
        }
    }
    Ok(())
}

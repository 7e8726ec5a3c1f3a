//! `pgoutbox dle`: list, show, redrive or skip dead-lettered rows (see
//! docs/dead-letters.md), and the text forms of what it prints.

use crate::config::Config;
use crate::error::Error;
use crate::outbox::dead_letter::{
    self, ActionOutcome, ActionRequest, DeadLetterError, DeadLetterRow, ListFilter, Listing,
    OutboxTable, Selection,
};

use super::{connect_for_command, to_json};

/// A `pgoutbox dle` subcommand (see `docs/dead-letters.md`).
#[derive(Clone, Debug)]
pub enum DleCommand {
    /// `dle list`: the newest dead-lettered rows and counts by error.
    List {
        /// Filters and limit.
        filter: ListFilter,
        /// JSON instead of a table.
        json: bool,
    },
    /// `dle show <tracking_id>`: one row in full.
    Show {
        /// The row's tracking id.
        tracking_id: uuid::Uuid,
        /// JSON instead of text.
        json: bool,
    },
    /// `dle redrive`: back to `PENDING` with `retry_count = 0`, audited.
    Redrive {
        /// Rows, reason, dry run.
        request: ActionRequest,
        /// JSON instead of text.
        json: bool,
    },
    /// `dle skip`: to `COMPLETED` with `processed_at = NULL`, audited.
    Skip {
        /// Rows, reason, dry run.
        request: ActionRequest,
        /// JSON instead of text.
        json: bool,
    },
}

/// `pgoutbox dle …`: inspect, redrive or skip dead-lettered rows. Output
/// goes to stdout; a refusal or a failure is an error (non-zero exit), and a
/// redrive or skip that matches no dead-lettered row is one too.
pub async fn dle(config: &Config, command: DleCommand) -> Result<(), Error> {
    let table = OutboxTable {
        schema: config.outbox.schema.clone(),
        table: config.outbox.table.clone(),
        announce_prefix: config
            .cdc
            .messages
            .then(|| config.cdc.message_prefix.clone()),
    };
    // Refuse what can be refused before connecting.
    let action = match &command {
        DleCommand::Redrive { request, .. } => Some((dead_letter::Action::Redrive, request)),
        DleCommand::Skip { request, .. } => Some((dead_letter::Action::Skip, request)),
        DleCommand::List { .. } | DleCommand::Show { .. } => None,
    };
    if let Some((action, request)) = action {
        dead_letter::check_reason(action, request.reason.as_deref()).map_err(dle_error)?;
        if let Selection::Where(w) = &request.selection {
            dead_letter::check_where(w).map_err(dle_error)?;
        }
    }
    let mut client = connect_for_command(config).await?;
    match command {
        DleCommand::List { filter, json } => {
            let listing = dead_letter::list(&client, &table, &filter)
                .await
                .map_err(dle_error)?;
            if json {
                println!("{}", to_json(&listing)?);
            } else {
                print!("{}", format_listing(&listing));
            }
        }
        DleCommand::Show { tracking_id, json } => {
            let rows = dead_letter::show(&client, &table, tracking_id)
                .await
                .map_err(dle_error)?;
            if json && rows.len() == 1 {
                println!("{}", to_json(&rows[0])?);
            } else if json {
                println!("{}", to_json(&rows)?);
            } else {
                let text: Vec<String> = rows.iter().map(format_row).collect();
                print!("{}", text.join("\n"));
            }
        }
        DleCommand::Redrive { request, json } => {
            let outcome = dead_letter::redrive(&mut client, &table, &request)
                .await
                .map_err(dle_error)?;
            print_outcome(&outcome, json)?;
        }
        DleCommand::Skip { request, json } => {
            let outcome = dead_letter::skip(&mut client, &table, &request)
                .await
                .map_err(dle_error)?;
            print_outcome(&outcome, json)?;
        }
    }
    Ok(())
}

/// A dead-letter error as a relay error: database failures classified like
/// any other (with a hint for a bad `--where` or a statement timeout),
/// refusals as fatal one-liners.
fn dle_error(e: DeadLetterError) -> Error {
    match e {
        DeadLetterError::Database { context, source } => Error::selection(&context, &source),
        other => Error::Fatal(other.to_string()),
    }
}

/// One line, at most `max` characters (an ellipsis when cut).
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default().replace('\t', " ");
    let cut = text.lines().nth(1).is_some();
    if line.chars().count() > max {
        let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    } else if cut {
        format!("{line} …")
    } else {
        line
    }
}

/// `2025-01-02T03:04:05.123456Z` without the fraction.
fn short_time(ts: &str) -> String {
    match ts.split_once('.') {
        Some((whole, _)) => format!("{whole}Z"),
        None => ts.to_owned(),
    }
}

/// The text form of `dle list`: a table of the newest rows, then the
/// counts by error.
fn format_listing(listing: &Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if listing.total == 0 {
        let _ = writeln!(out, "no dead-lettered rows in {} match", listing.table);
        return out;
    }
    let header = [
        "TRACKING_ID",
        "CREATED_AT",
        "AGGREGATE_TYPE",
        "EVENT_TYPE",
        "TRIES",
        "LAST_ERROR",
    ];
    let cells: Vec<[String; 6]> = listing
        .rows
        .iter()
        .map(|r| {
            [
                r.tracking_id.to_string(),
                short_time(&r.created_at),
                r.aggregate_type.clone(),
                r.event_type.clone(),
                format!("{}/{}", r.retry_count, r.max_retries),
                one_line(r.last_error.as_deref().unwrap_or("-"), 100),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let pad = widths[i] - c.chars().count();
                l.push_str(c);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&header);
    for row in &cells {
        let cols: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cols);
    }
    let _ = writeln!(
        out,
        "\n{} dead-lettered row{} in {} match (newest {} shown)",
        listing.total,
        if listing.total == 1 { "" } else { "s" },
        listing.table,
        listing.rows.len()
    );
    let _ = writeln!(out, "\nBY ERROR\n{:>7}  ERROR", "COUNT");
    for g in &listing.by_error {
        let error = if g.error.is_empty() {
            "(no last_error)".to_owned()
        } else {
            one_line(&g.error, 160)
        };
        let _ = writeln!(out, "{:>7}  {}", g.count, error);
    }
    let more = listing.error_groups - listing.by_error.len() as i64;
    if more > 0 {
        let _ = writeln!(
            out,
            "    ...  and {more} more distinct errors (--json or narrower filters)"
        );
    }
    out
}

/// Every line of `text`, indented by two spaces.
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect::<String>()
}

/// The text form of `dle show`: one row in full, with its history.
fn format_row(row: &DeadLetterRow) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let none = "-".to_owned();
    let _ = writeln!(out, "tracking_id     {}", row.tracking_id);
    let _ = writeln!(out, "id              {}", row.id);
    let _ = writeln!(out, "status          {}", row.status);
    let _ = writeln!(out, "aggregate_type  {}", row.aggregate_type);
    let _ = writeln!(out, "aggregate_id    {}", row.aggregate_id);
    let _ = writeln!(out, "event_type      {}", row.event_type);
    let _ = writeln!(
        out,
        "attempts        {}/{}",
        row.retry_count, row.max_retries
    );
    let _ = writeln!(out, "created_at      {}", row.created_at);
    let _ = writeln!(
        out,
        "processed_at    {}",
        row.processed_at.as_ref().unwrap_or(&none)
    );
    let _ = writeln!(
        out,
        "locked_until    {}",
        row.locked_until.as_ref().unwrap_or(&none)
    );
    let _ = write!(
        out,
        "last_error\n{}",
        indent(row.last_error.as_deref().unwrap_or("-"))
    );
    let _ = write!(out, "payload\n{}", indent(&row.payload_pretty));
    let _ = write!(out, "metadata\n{}", indent(&row.metadata_pretty));
    if row.history.is_empty() {
        let _ = writeln!(out, "history         none (never redriven or skipped)");
    } else {
        let _ = writeln!(out, "history");
        for h in &row.history {
            let _ = writeln!(
                out,
                "  #{} {} {} by {} ({} row{}): {}",
                h.id,
                short_time(&h.performed_at),
                h.action,
                h.performed_by,
                h.row_count,
                if h.row_count == 1 { "" } else { "s" },
                one_line(&h.reason, 200)
            );
        }
    }
    out
}

/// Prints what a redrive or skip did (or would do, on a dry run).
fn print_outcome(outcome: &ActionOutcome, json: bool) -> Result<(), Error> {
    if json {
        println!("{}", to_json(outcome)?);
        return Ok(());
    }
    const SHOWN: usize = 20;
    let n = outcome.tracking_ids.len();
    let rows = if n == 1 { "row" } else { "rows" };
    let done = match outcome.action {
        dead_letter::Action::Redrive => "redrove",
        dead_letter::Action::Skip => "skipped",
    };
    match (&outcome.audit, outcome.dry_run) {
        (Some(a), false) => println!(
            "{done} {n} dead-lettered {rows} of {} (audit entry #{} by {} at {})",
            outcome.table, a.id, a.performed_by, a.performed_at
        ),
        _ => println!(
            "dry run: would {} {n} dead-lettered {rows} of {}; nothing was changed",
            outcome.action, outcome.table
        ),
    }
    for id in outcome.tracking_ids.iter().take(SHOWN) {
        println!("  {id}");
    }
    if n > SHOWN {
        println!("  … and {} more", n - SHOWN);
    }
    if !outcome.not_dead_letter.is_empty() {
        println!(
            "not {}: {} given tracking id{} with no DEAD_LETTER row (already redriven or skipped, or never dead-lettered):",
            if outcome.action == dead_letter::Action::Redrive { "redriven" } else { "skipped" },
            outcome.not_dead_letter.len(),
            if outcome.not_dead_letter.len() == 1 { "" } else { "s" },
        );
        for id in &outcome.not_dead_letter {
            println!("  {id}");
        }
    }
    Ok(())
}
